# Curvature products (R-operator), for one block; curvature_product sums them over all
# rows with exact_sums.pxi's accumulators, bitwise the same for any thread count. Called
# by fastbp/_network.py (Network._curvature: gnvp, hessp, and the products that the
# Newton and Hessian-free solvers take through _objective.py).
#
# Direction v = {V_l, c_l} in the flat layout. With A_l the activations and D_l the deltas
# of the gradient pass:
#   R-forward   RZ_1 = X V_1 + c_1;  RZ_l = RA_{l-1} W_l + A_{l-1} V_l + c_l;  RA_l = f'.*RZ_l
#   output      RD_L = H_out(RZ_L) * w_i * scale, per row: softmax sum(y) (p.*r - p (p.r)),
#               logistic p(1-p).*r, identity r, exp p.*r
#   Gauss-Newton (Schraudolph): backpropagate RD_L like a delta:
#               G_W_l = A_{l-1}^T RD_l;  RD_{l-1} = (RD_l W_l^T) .* f'(A_{l-1})
#   Hessian (Pearlmutter): also the ordinary deltas D_l, and
#               H_W_l = A_{l-1}^T RD_l + RA_{l-1}^T D_l
#               RD_{l-1} = (RD_l W_l^T + D_l V_l^T) .* f' + (D_l W_l^T) .* f'' .* RZ_{l-1}
# Intercept parts are column sums of RD_l (float64); the L2 term adds alpha*scale*V_l.
# f' and f'' are written in terms of A_l where that is exact (_act_deriv_mul,
# activation_rbackward); gelu and silu layers read their Z_l from the forward cache.
#
# Per-thread workspace for B rows: RA_1..RA_L | RZ_1..RZ_{L-1} | one target row (sparse
# targets) | 4 scratch (B, w), with w the widest non-input layer (the output deltas live
# in scratch too). The forward pass of
# every block lives in a cache, so that repeated products at the same theta (Newton-CG,
# CG inside Hessian-free) skip it. One block of the cache, B rows:
#   A_1 | ... | A_L | Z_k for each hidden layer k that keeps K (gelu, silu, softplus;
#   softplus's f' and f'' come from A_k, so its Z_k goes unread), in layer order
# (the start of block_pass.pxi's workspace layout, so the same offsets serve). The cdef
# kernels are noexcept nogil and allocate nothing.

def acts_size(const Py_ssize_t[::1] sizes, const int[::1] acts, Py_ssize_t n_samples,
              Py_ssize_t block):
    """Elements of the forward cache (activations, and the kept pre-activations of the
    hidden layers ``acts`` marks as gelu or silu) for n_samples rows in blocks."""
    cdef Py_ssize_t total = _kept_units(sizes, acts), l
    cdef Py_ssize_t n_blocks = (n_samples + block - 1) // block
    for l in range(1, sizes.shape[0]):
        total += sizes[l]
    return n_blocks * block * total

def rop_workspace_size(const Py_ssize_t[::1] sizes, Py_ssize_t block):
    """Elements of one thread's workspace for curvature products over ``block`` rows
    (the forward pass lives in a separate per-block cache, ``acts_size``, so this does
    not depend on the activations)."""
    cdef Py_ssize_t total = 0, widest = 1
    cdef Py_ssize_t l, L = sizes.shape[0] - 1
    for l in range(1, L + 1):
        total += sizes[l]
        if l < L:
            total += sizes[l]
        if sizes[l] > widest:
            widest = sizes[l]
    return block * (total + 4 * widest) + _yrow_len(sizes[L])


cdef inline Py_ssize_t _rop_ra(const Spec* sp, int l) noexcept nogil:
    return _act_offset(sp, l)


cdef inline Py_ssize_t _rop_rz(const Spec* sp, int l) noexcept nogil:
    return _act_offset(sp, sp.n_layers + 1) + _act_offset(sp, l)


cdef inline Py_ssize_t _rop_yrow(const Spec* sp) noexcept nogil:
    """The target row (sparse targets), after RA_1..RA_L and RZ_1..RZ_{L-1}."""
    return _act_offset(sp, sp.n_layers + 1) + _act_offset(sp, sp.n_layers)


cdef inline Py_ssize_t _rop_scratch(const Spec* sp) noexcept nogil:
    return _rop_yrow(sp) + _yrow_len(sp.sizes[sp.n_layers])


cdef void _add_bias(floating* Z, const floating* c, Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(m):
            Z[i * m + j] = Z[i * m + j] + c[j]


cdef void _act_deriv_mul(floating* R, const floating* A, const floating* Zpre,
                         Py_ssize_t n, Py_ssize_t m, int act) noexcept nogil:
    """R <- R .* f'(A), with f' written in terms of A = f(Z), or of the pre-activations
    Zpre for gelu and silu (NULL for the others)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t nm = n * m
    cdef floating one = 1  # literals would be double: keep the layer's precision
    if act == ACT_RELU:
        for i in range(nm):
            R[i] = R[i] if A[i] > 0 else 0
    elif act == ACT_TANH:
        for i in range(nm):
            R[i] = R[i] * (one - A[i] * A[i])
    elif act == ACT_LOGISTIC:
        for i in range(nm):
            R[i] = R[i] * A[i] * (one - A[i])
    elif act == ACT_LEAKY_RELU:
        for i in range(nm):
            R[i] = R[i] if A[i] > 0 else R[i] * <floating> 0.01
    elif act == ACT_ELU:
        for i in range(nm):
            R[i] = R[i] if A[i] > 0 else R[i] * (A[i] + one)
    elif act == ACT_SOFTPLUS:
        for i in range(nm):
            R[i] = R[i] * -_expm1(-A[i])
    elif act == ACT_GELU:
        for i in range(nm):
            R[i] = R[i] * _gelu_d1(Zpre[i])
    elif act == ACT_SILU:
        for i in range(nm):
            R[i] = R[i] * _silu_d1(Zpre[i])


cdef inline void _rstep(floating* rd, floating* d, const floating* rz, Py_ssize_t j,
                        floating d1, floating d2) noexcept nogil:
    """One element of activation_rbackward: rd <- rd f' + d f'' rz, d <- d f'."""
    rd[j] = rd[j] * d1 + d[j] * d2 * rz[j]
    d[j] = d[j] * d1


cdef void activation_rbackward(floating* RD, floating* D, const floating* A,
                               const floating* Zpre, const floating* RZ, Py_ssize_t n,
                               Py_ssize_t m, int act, double* db) noexcept nogil:
    """RD <- RD .* f' + D .* f'' .* RZ and D <- D .* f'; db += colsum(RD). f' and f''
    are written in terms of A = f(Z), or of Zpre for gelu and silu (NULL otherwise):
    tanh f' = 1 - A^2, f'' = -2 A f'; logistic f' = A (1 - A), f'' = f' (1 - 2 A); relu
    f' = [A > 0], f'' = 0; leaky_relu f' = 1 or 0.01 by the sign of A, f'' = 0; elu f' =
    1 or A + 1, f'' = 0 or A + 1; softplus f' = sigmoid(z) = -expm1(-A), f'' = f'(1 - f');
    gelu and silu from z (layers.pxi's _gelu_parts and _sigmoid), each once per element.

    On entry RD = RD_l W_l^T + D_l V_l^T and D = D_l W_l^T (both (n, m)). One loop per
    activation, the choice made once per row, so that each loop can vectorize."""
    cdef Py_ssize_t i, j
    cdef floating a, d1, d2, z, c, p, s
    cdef floating one = 1, two = 2  # literals would be double: keep the layer's precision
    cdef floating* rd
    cdef floating* d
    cdef const floating* ar
    cdef const floating* zp
    cdef const floating* rz
    for i in range(n):
        rd = RD + i * m
        d = D + i * m
        ar = A + i * m
        rz = RZ + i * m
        zp = Zpre + i * m if Zpre != NULL else NULL
        if act == ACT_TANH:
            for j in range(m):
                a = ar[j]
                d1 = one - a * a
                d2 = -two * a * d1
                _rstep(rd, d, rz, j, d1, d2)
        elif act == ACT_LOGISTIC:
            for j in range(m):
                a = ar[j]
                d1 = a * (one - a)
                d2 = d1 * (one - two * a)
                _rstep(rd, d, rz, j, d1, d2)
        elif act == ACT_RELU:
            for j in range(m):
                d1 = 1 if ar[j] > 0 else 0
                _rstep(rd, d, rz, j, d1, 0)
        elif act == ACT_LEAKY_RELU:
            for j in range(m):
                d1 = 1 if ar[j] > 0 else <floating> 0.01
                _rstep(rd, d, rz, j, d1, 0)
        elif act == ACT_ELU:
            for j in range(m):
                a = ar[j]
                d1 = 1 if a > 0 else a + one
                d2 = 0 if a > 0 else a + one
                _rstep(rd, d, rz, j, d1, d2)
        elif act == ACT_SOFTPLUS:
            for j in range(m):
                d1 = -_expm1(-ar[j])
                d2 = d1 * (one - d1)
                _rstep(rd, d, rz, j, d1, d2)
        elif act == ACT_GELU:
            # f' = Phi + z phi, f'' = phi (2 - z^2) (0 where phi underflows, before z^2
            # overflows), from one evaluation of Phi and phi.
            for j in range(m):
                z = zp[j]
                c = _gelu_parts(z, &p)
                d2 = p * (two - z * z) if p != 0 else 0
                _rstep(rd, d, rz, j, c + z * p, d2)
        elif act == ACT_SILU:
            # f' = s (1 + z (1 - s)), f'' = s (1 - s) (2 + z (1 - 2 s)), s = sigmoid(z).
            for j in range(m):
                z = zp[j]
                s = _sigmoid(z)
                _rstep(rd, d, rz, j, s * (one + z * (one - s)),
                       s * (one - s) * (two + z * (one - two * s)))
        else:
            for j in range(m):
                _rstep(rd, d, rz, j, 1, 0)
        for j in range(m):
            db[j] += rd[j]


cdef void output_curvature(floating* R, const floating* P, floating* D,
                           const floating* Y, const Spec* sp, floating* yrow,
                           const double* sw, const Py_ssize_t* rows, Py_ssize_t start,
                           Py_ssize_t n, Py_ssize_t m, int out, double scale,
                           double* db) noexcept nogil:
    """R (n, m) <- H_out(R) * w_i * scale per row, with P the output activations; adds
    colsum to db. When D is not NULL, also D <- dloss/dz * w_i * scale (the deltas)."""
    cdef Py_ssize_t i, j, r
    cdef const floating* y
    cdef floating* rr
    cdef const floating* p
    cdef floating c, ysum, pr, one = 1
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        # The targets are read by softmax's sum(y) and by the deltas only.
        y = _target_row(sp, Y, r, m, yrow) if out == OUT_SOFTMAX or D != NULL else NULL
        c = <floating> ((sw[r] if sw != NULL else 1.0) * scale)
        rr = R + i * m
        p = P + i * m
        ysum = 1
        if out == OUT_SOFTMAX:
            ysum = 0
            pr = 0
            for j in range(m):
                ysum = ysum + y[j]
                pr = pr + p[j] * rr[j]
            for j in range(m):
                rr[j] = ysum * p[j] * (rr[j] - pr) * c
        elif out == OUT_LOGISTIC:
            for j in range(m):
                rr[j] = p[j] * (one - p[j]) * rr[j] * c
        elif out == OUT_EXP:
            for j in range(m):
                rr[j] = p[j] * rr[j] * c
        else:
            for j in range(m):
                rr[j] = rr[j] * c
        for j in range(m):
            db[j] += rr[j]
        if D != NULL:
            for j in range(m):
                D[i * m + j] = (ysum * p[j] - y[j]) * c


cdef void block_rop(const Spec* sp, const Input* inp, Py_ssize_t start, Py_ssize_t n,
                    const floating* Y, const double* sw, double scale,
                    const floating* theta, const floating* v, floating* out_w,
                    double* dacc, floating* work, floating* acts, bint have_forward,
                    bint accumulate, bint exact) noexcept nogil:
    """Add this block's Gauss-Newton (or, with ``exact``, Hessian) product with v.

    out_w receives the coefficient part (gemm beta = 1 when accumulate, else overwritten);
    dacc (float64, laid out like theta's intercepts) the intercept part. acts is this
    block of the forward cache (A_1..A_L, then the kept Z_k): computed here unless
    ``have_forward`` (same theta as before).
    """
    cdef int L = sp.n_layers, l
    cdef const Py_ssize_t* s = sp.sizes
    cdef Py_ssize_t s0 = s[0], lda0 = 0, i
    cdef bint trans0 = False
    cdef bint is_sparse = inp.X == NULL
    cdef const floating* X = <const floating*> inp.X
    cdef const floating* A0 = NULL
    cdef floating* Z
    cdef floating* RZ
    cdef floating* scr = work + _rop_scratch(sp)
    cdef Py_ssize_t hb = 1
    cdef floating* D
    cdef floating* RD
    cdef floating* Dn
    cdef floating* RDn
    cdef floating* tmp
    cdef floating beta = 1 if accumulate else 0
    cdef double* db

    for l in range(1, L + 1):
        if s[l] > hb:
            hb = s[l]
    hb = hb * sp.block
    if not is_sparse:
        if inp.x_fortran:
            A0 = X + start
            trans0 = True
        else:
            A0 = X + start * inp.ldx
        lda0 = inp.ldx

    # Forward (A_l), then the output activations P = A_L; cached across calls.
    if not have_forward:
        for l in range(1, L + 1):
            Z = acts + _act_offset(sp, l)
            if l == 1:
                _input_product(sp, inp, NULL, start, n, A0, trans0, lda0,
                               theta + sp.w_off[0], Z)
            else:
                gemm(False, False, <int> n, <int> s[l], <int> s[l - 1], <floating> 1.0,
                     acts + _act_offset(sp, l - 1), <int> s[l - 1], theta + sp.w_off[l - 1],
                     <int> s[l], <floating> 0.0, Z, <int> s[l])
            if l < L:
                bias_activate(Z, theta + sp.b_off[l - 1], _z_ptr(sp, acts, l), n, s[l],
                              _act(sp, l), False)
            else:
                output_activate(Z, theta + sp.b_off[L - 1], n, s[L], sp.out)

    # R-forward: RA_l holds RZ_l until f' is applied; RZ_l (hidden) is kept for f''.
    for l in range(1, L + 1):
        RZ = work + _rop_ra(sp, l)
        if l == 1:
            _input_product(sp, inp, NULL, start, n, A0, trans0, lda0, v + sp.w_off[0], RZ)
        else:
            gemm(False, False, <int> n, <int> s[l], <int> s[l - 1], <floating> 1.0,
                 work + _rop_ra(sp, l - 1), <int> s[l - 1], theta + sp.w_off[l - 1],
                 <int> s[l], <floating> 0.0, RZ, <int> s[l])
            gemm(False, False, <int> n, <int> s[l], <int> s[l - 1], <floating> 1.0,
                 acts + _act_offset(sp, l - 1), <int> s[l - 1], v + sp.w_off[l - 1],
                 <int> s[l], <floating> 1.0, RZ, <int> s[l])
        _add_bias(RZ, v + sp.b_off[l - 1], n, s[l])
        if l < L:
            memcpy(work + _rop_rz(sp, l), RZ, n * s[l] * sizeof(floating))
            _act_deriv_mul(RZ, acts + _act_offset(sp, l), _z_ptr(sp, acts, l), n, s[l],
                           _act(sp, l))

    # Output curvature: RD_L (in RA_L's place) and, for the Hessian, D_L.
    RD = work + _rop_ra(sp, L)
    D = scr if exact else NULL
    output_curvature(RD, acts + _act_offset(sp, L), D, Y, sp, work + _rop_yrow(sp), sw,
                     NULL, start, n, s[L],
                     sp.out, scale, dacc + (sp.b_off[L - 1] - sp.b_off[0]))

    # Backward.
    for l in range(L, 0, -1):
        # Coefficient part: A_{l-1}^T RD_l (+ RA_{l-1}^T D_l for the Hessian).
        if l == 1:
            if is_sparse:
                sparse_backward(<const floating*> inp.data, inp.indices, inp.indptr, NULL,
                                start, n, RD, out_w + sp.w_off[0], s0, s[1], accumulate)
            else:
                gemm(not trans0, False, <int> s0, <int> s[1], <int> n, <floating> 1.0, A0,
                     <int> lda0, RD, <int> s[1], beta, out_w + sp.w_off[0], <int> s[1])
            break
        gemm(True, False, <int> s[l - 1], <int> s[l], <int> n, <floating> 1.0,
             acts + _act_offset(sp, l - 1), <int> s[l - 1], RD, <int> s[l], beta,
             out_w + sp.w_off[l - 1], <int> s[l])
        if exact:
            gemm(True, False, <int> s[l - 1], <int> s[l], <int> n, <floating> 1.0,
                 work + _rop_ra(sp, l - 1), <int> s[l - 1], D, <int> s[l], <floating> 1.0,
                 out_w + sp.w_off[l - 1], <int> s[l])
        # Deltas one layer down.
        db = dacc + (sp.b_off[l - 2] - sp.b_off[0])
        RDn = scr + (1 + (l % 2)) * hb
        gemm(False, True, <int> n, <int> s[l - 1], <int> s[l], <floating> 1.0, RD,
             <int> s[l], theta + sp.w_off[l - 1], <int> s[l], <floating> 0.0, RDn,
             <int> s[l - 1])
        if exact:
            gemm(False, True, <int> n, <int> s[l - 1], <int> s[l], <floating> 1.0, D,
                 <int> s[l], v + sp.w_off[l - 1], <int> s[l], <floating> 1.0, RDn,
                 <int> s[l - 1])
            Dn = scr + 3 * hb if D == scr else scr
            gemm(False, True, <int> n, <int> s[l - 1], <int> s[l], <floating> 1.0, D,
                 <int> s[l], theta + sp.w_off[l - 1], <int> s[l], <floating> 0.0, Dn,
                 <int> s[l - 1])
            activation_rbackward(RDn, Dn, acts + _act_offset(sp, l - 1),
                                 _z_ptr(sp, acts, l - 1), work + _rop_rz(sp, l - 1), n,
                                 s[l - 1], _act(sp, l - 1), db)
            D = Dn
        else:
            activation_backward(RDn, acts + _act_offset(sp, l - 1),
                                _z_ptr(sp, acts, l - 1), n, s[l - 1], _act(sp, l - 1),
                                False, db)
        RD = RDn


def curvature_product(const floating[::1] theta, const floating[::1] v,
                      floating[::1] out_arr, const floating[:, :] X,
                      const floating[::1] data, const int[::1] indices,
                      const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
                      const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
                      const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
                      const int[::1] acts, int out, floating[:, ::1] work,
                      floating[:, ::1] tgrad, double[:, ::1] tdacc, int64_t[:, ::1] acc,
                      floating[::1] cache,
                      bint have_forward, Py_ssize_t block, double scale, double alpha,
                      bint exact, int n_threads, bint finish=True,
                      const floating[::1] y_data=None, const int[::1] y_indices=None,
                      const Py_ssize_t[::1] y_indptr=None):
    """Gauss-Newton (or exact Hessian) times v over all rows, into out_arr (n_params,).

    Blocks, threads, buffers and exact sums as in ``loss_grad`` (bitwise the same for any
    n_threads; ``finish`` False leaves the sums in acc[0], see ``finish_product``). work
    is (n_threads, rop_workspace_size(sizes, block)); cache (acts_size(...)) holds the
    forward activations: pass ``have_forward`` when it holds them for this theta. acts:
    one activation code per hidden layer.
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = _n_rows(Y, y_indptr), n_params = theta.shape[0], i
    cdef Py_ssize_t n_blocks = (n + block - 1) // block
    cdef Py_ssize_t n_int = tdacc.shape[1], ws = work.shape[1], n_coef = b_off[0]
    cdef Py_ssize_t asz = acc.shape[1]
    cdef const double* sw = NULL
    cdef const floating* theta_p = &theta[0]
    cdef const floating* v_p = &v[0]
    cdef floating* o = &out_arr[0]
    cdef const floating* Y_p = NULL
    cdef floating* work_p = &work[0, 0]
    cdef floating* tg = &tgrad[0, 0]
    cdef double* td = &tdacc[0, 0]
    cdef int64_t* acc_p = &acc[0, 0]
    cdef floating* cache_p = &cache[0]
    cdef Py_ssize_t per_block
    cdef int tid
    cdef Py_ssize_t b, start
    cdef bint ok
    if v.shape[0] != n_params or out_arr.shape[0] != n_params:
        raise ValueError("direction or output does not match theta")
    _check_exact_buffers(n_params, n_params - n_coef, n_threads, work, tgrad, tdacc, acc)
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, block, X, data, indices, indptr, theta)
    _fill_targets(&sp, Y, y_data, y_indices, y_indptr, &Y_p)
    per_block = _z_offset(&sp, sp.n_layers)  # A_1..A_L and the kept Zs of one block
    if cache.shape[0] < n_blocks * per_block:
        raise ValueError("the forward cache is too small")
    if ws < rop_workspace_size(sizes, block):
        raise ValueError("the workspace is too small")
    if sample_weight is not None:
        sw = &sample_weight[0]
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        memset(acc_p + tid * asz, 0, asz * sizeof(int64_t))
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            memset(td + tid * n_int, 0, n_int * sizeof(double))
            block_rop(&sp, &inp, start, min(block, n - start), Y_p, sw, scale, theta_p,
                      v_p, tg + tid * n_params, td + tid * n_int, work_p + tid * ws,
                      cache_p + b * per_block, have_forward, False, exact)
            ok = _fx_block(acc_p + tid * asz, tg + tid * n_params, n_coef, 0)
            ok = _fx_block64(acc_p + tid * asz, td + tid * n_int, n_int, n_coef) and ok
            if not ok:
                acc_p[tid * asz + FXW * (n_params + 1)] += 1
    with nogil:
        _fx_merge_threads(acc_p, n_threads, asz)
        if finish:
            # The L2 term and the intercept parts, exactly as for a gradient (v for W).
            _finish(&sp, acc_p, v_p, o, td, n_params, scale, alpha, False)
