# The forward/backward pass over one block of rows, and the gradient's finish. For a
# block of n rows:
#
#   forward    Z_l = A_{l-1} W_l + 1 b_l^T,  A_l = f(Z_l)          (gemm, then one fused pass)
#   output     A_L = g(Z_L), loss_i, Delta_L = (A_L - Y) * w_i * scale   (one fused pass)
#   backward   dW_l (+)= A_{l-1}^T Delta_l                          (gemm, beta 0 or 1)
#              Delta_{l-1} = (Delta_l W_l^T) .* f'(A_{l-1})         (gemm, then one fused pass)
#              db_l += colsum(Delta_l)                             (float64, in the fused pass)
#
# f' is computed from the activations where that is exact (logistic a(1-a), tanh 1-a^2,
# relu a>0, leaky_relu, elu; see layers.pxi), so those layers store nothing more unless
# they drop units (then their M, below); gelu, silu and softplus layers keep
# K_l = f'(Z_l) beside A_l (the layout below, where the curvature cache keeps Z_l
# instead), written by the forward pass, so that the backward pass only multiplies. Each
# hidden layer has its own activation (Spec.acts). Deltas overwrite the output buffer,
# then ping-pong between two scratch buffers. Inputs can be a dense C- or F-ordered matrix (an F-ordered
# one is used through gemm's transpose flag) or CSR arrays, for which the first layer
# multiplies the sparse rows directly. A row-index array lets a minibatch address rows
# without copying Y or the weights; dense minibatch rows are gathered into a workspace.
#
# block_pass's loops over the layers are forward_layers and backward_layers, which the
# units split (unit_split.pxi) also runs on the layers above its first.
#
# finish_gradient writes the intercept gradients from their float64 sums and adds the L2
# term: grad_W += alpha * scale * W. noexcept nogil, allocation-free, one fixed order of
# operations per block. Callers: loss_grad and forward (exact_sums.pxi), run_epoch
# (epoch.pxi), block_fisher (fisher.pxi); curvature.pxi reuses the workspace offsets and
# _input_product. workspace_size is called by fastbp/_network.py and _stochastic.py.

# ---------------------------------------------------------------------------------------
# Workspace layout for a block of B rows:
#   A_1 (B, s_1) | ... | A_L (B, s_L) | Z_k (B, s_k) for each hidden layer k that keeps
#   K (gelu, silu, softplus), in layer order | M_k (B, s_k) for each hidden layer k with
#   dropout and no K, in layer order | y (s_L, rounded up to 16) | D0 (B, h) | D1 (B, h) |
#   Xg (B, s_0)
# with h the widest hidden layer. A_L holds the output, then Delta_L. The part up to the
# Zs is also the layout of one block of curvature.pxi's forward cache. A dropping layer's
# masked derivative f'(Z_k) .* mask / (1 - rate) is written by the forward pass into its
# K, or its M, so the backward pass draws no mask again. y takes one row of sparse
# targets at a time (the output layer's loss reads it).

cdef inline Py_ssize_t _act_offset(const Spec* sp, int l) noexcept nogil:
    """Offset of A_l (l >= 1) in the workspace."""
    cdef Py_ssize_t off = 0
    cdef int k
    for k in range(1, l):
        off += sp.block * sp.sizes[k]
    return off


cdef inline Py_ssize_t _z_offset(const Spec* sp, int l) noexcept nogil:
    """Offset of Z_l for a hidden layer l that keeps it (l = n_layers: the end of the
    kept Zs). Relative to the start of a workspace, or of one block of the forward cache."""
    cdef Py_ssize_t off = _act_offset(sp, sp.n_layers + 1)
    cdef int k
    for k in range(1, l):
        if _keeps_z(sp, k):
            off += sp.block * sp.sizes[k]
    return off


cdef inline floating* _z_ptr(const Spec* sp, floating* base, int l) noexcept nogil:
    """Z_l in the workspace (or cache block) at base, or NULL when layer l keeps no Z."""
    return base + _z_offset(sp, l) if _keeps_z(sp, l) else NULL


cdef inline bint _dropped(const Spec* sp, int l) noexcept nogil:
    """Whether hidden layer l drops units (training with dropout only)."""
    return sp.drop != NULL and sp.drop[l - 1] > 0


cdef inline Py_ssize_t _m_offset(const Spec* sp, int l) noexcept nogil:
    """Offset of M_l, the masked derivative of a hidden layer l that drops and keeps no
    K of its own (l = n_layers: the end of the M buffers)."""
    cdef Py_ssize_t off = _z_offset(sp, sp.n_layers)
    cdef int k
    for k in range(1, l):
        if _dropped(sp, k) and not _keeps_z(sp, k):
            off += sp.block * sp.sizes[k]
    return off


cdef inline floating* _m_ptr(const Spec* sp, floating* work, int l) noexcept nogil:
    """Where a dropping layer l keeps its masked derivative: its K (gelu, silu,
    softplus), or an M buffer of its own."""
    return work + (_z_offset(sp, l) if _keeps_z(sp, l) else _m_offset(sp, l))


cdef inline Py_ssize_t _yrow_offset(const Spec* sp) noexcept nogil:
    """Offset of the target row (one row of sparse targets, scattered)."""
    return _m_offset(sp, sp.n_layers)


cdef inline Py_ssize_t _scratch_offset(const Spec* sp) noexcept nogil:
    return _yrow_offset(sp) + _yrow_len(sp.sizes[sp.n_layers])


cdef inline Py_ssize_t _xg_offset(const Spec* sp) noexcept nogil:
    """Offset of the gathered dense input rows Xg (the last part of the workspace)."""
    return _scratch_offset(sp) + 2 * sp.block * sp.max_hidden


cdef inline uint64_t _row_hash(uint64_t seed, uint64_t key, int l) noexcept nogil:
    """Dropout's per-(row, layer) hash in the epoch of ``seed`` (splitmix64's mixing)."""
    cdef uint64_t z = seed ^ (key * <uint64_t> 0x9E3779B97F4A7C15)
    z = (z ^ (z >> 30)) * <uint64_t> 0xBF58476D1CE4E5B9
    z ^= <uint64_t> l * <uint64_t> 0xD1B54A32D192ED03
    z = (z ^ (z >> 27)) * <uint64_t> 0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline uint32_t _unit_bits(uint32_t lo, uint32_t hi, uint32_t j) noexcept nogil:
    """32 random bits for unit j of a row whose hash is (hi, lo): murmur3's finaliser, in
    32-bit integer operations so the loop over units vectorizes."""
    cdef uint32_t x = lo ^ (j * <uint32_t> 0x9E3779B9)
    x ^= x >> 16
    x *= <uint32_t> 0x85EBCA6B
    x ^= (x >> 13) ^ hi
    x *= <uint32_t> 0xC2B2AE35
    return x ^ (x >> 16)


cdef inline uint32_t _drop_threshold(double rate) noexcept nogil:
    """A unit is kept when its 32 bits are >= this: probability 1 - rate (to 2^-32)."""
    return <uint32_t> (rate * 4294967296.0)


cdef inline bint _keep_unit(uint64_t seed, uint64_t row, int l, Py_ssize_t j,
                            double rate) noexcept nogil:
    """Dropout's draw for (sample key ``row``, hidden layer l, unit j) in the epoch of
    ``seed``: a counter-based generator, so the forward and the backward pass, and any
    split of a minibatch into chunks, see the same mask; kept with probability
    1 - rate. (The loops below inline the same arithmetic.)"""
    cdef uint64_t h = _row_hash(seed, row, l)
    return _unit_bits(<uint32_t> h, <uint32_t> (h >> 32), <uint32_t> j) >= \
        _drop_threshold(rate)


cdef void _drop_units(const Spec* sp, floating* A, floating* M, const Py_ssize_t* rows,
                      Py_ssize_t start, Py_ssize_t n, int l) noexcept nogil:
    """Inverted dropout on hidden layer l: A (n, s_l) <- A .* mask / (1 - rate), and the
    derivative f'(z) in M (n, s_l) likewise, so that the backward pass only multiplies
    by M (the masks are drawn once per step)."""
    cdef Py_ssize_t i, j, r, m = sp.sizes[l]
    cdef uint64_t key, h
    cdef uint32_t lo, hi, t = _drop_threshold(sp.drop[l - 1])
    cdef floating keep = <floating> (1.0 / (1.0 - sp.drop[l - 1]))
    cdef floating* a
    cdef floating* d
    cdef bint kept
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        key = sp.row_keys[r] if sp.row_keys != NULL else <uint64_t> r
        h = _row_hash(sp.drop_seed, key, l)
        lo = <uint32_t> h
        hi = <uint32_t> (h >> 32)
        a = A + i * m
        d = M + i * m
        for j in range(m):
            kept = _unit_bits(lo, hi, <uint32_t> j) >= t
            a[j] = a[j] * keep if kept else 0
            d[j] = d[j] * keep if kept else 0


cdef Py_ssize_t _dropped_units(const Py_ssize_t[::1] sizes, const double[::1] drop,
                               const int[::1] acts) except -1:
    """Units of the hidden layers with dropout that need an M buffer (those that keep
    no K), for the workspace size. acts: one code per hidden layer, or None."""
    cdef Py_ssize_t l, total = 0
    if drop is None:
        return 0
    if drop.shape[0] != sizes.shape[0] - 2:
        raise ValueError(f"drop needs one rate per hidden layer ({sizes.shape[0] - 2}), "
                         f"got {drop.shape[0]}")
    for l in range(drop.shape[0]):
        if not 0.0 <= drop[l] < 1.0:
            raise ValueError(f"dropout rates must be in [0, 1), got {drop[l]}")
        if drop[l] > 0 and not (acts is not None and _z_code(acts[l])):
            total += sizes[l + 1]
    return total


cdef Py_ssize_t _kept_units(const Py_ssize_t[::1] sizes, const int[::1] acts) except -1:
    """Units of the hidden layers that keep K (gelu, silu, softplus), for the workspace
    sizes.
    acts: one code per hidden layer, or None (no layer keeps Z)."""
    cdef Py_ssize_t l, total = 0
    if acts is None:
        return 0
    if acts.shape[0] != sizes.shape[0] - 2:
        raise ValueError(f"acts needs one activation code per hidden layer "
                         f"({sizes.shape[0] - 2}), got {acts.shape[0]}")
    for l in range(acts.shape[0]):
        if _z_code(acts[l]):
            total += sizes[l + 1]
    return total


def workspace_size(const Py_ssize_t[::1] sizes, const int[::1] acts, Py_ssize_t block,
                   bint gather=True, const double[::1] drop=None):
    """Number of elements in the workspace for ``sizes``, the hidden layers'
    activation codes ``acts`` and ``block`` rows.

    ``gather=False`` leaves out the buffer that dense minibatch rows are gathered into
    (not needed for sparse input, nor for full-batch passes over dense rows in place).
    ``drop``: the hidden layers' dropout rates (training), or None.
    """
    cdef Py_ssize_t total = _kept_units(sizes, acts) + _dropped_units(sizes, drop, acts)
    cdef Py_ssize_t hidden = 1
    cdef Py_ssize_t l, L = sizes.shape[0] - 1
    for l in range(1, L + 1):
        total += sizes[l]
        if l < L and sizes[l] > hidden:
            hidden = sizes[l]
    return block * (total + 2 * hidden + (sizes[0] if gather else 0)) + _yrow_len(sizes[L])


cdef void _input_product(const Spec* sp, const Input* inp, const Py_ssize_t* rows,
                         Py_ssize_t start, Py_ssize_t n, const floating* A0, bint trans0,
                         Py_ssize_t lda0, const floating* W, floating* Z) noexcept nogil:
    """Z (n, s_1) = X_block W for the first layer: CSR rows are multiplied directly
    (rows as for sparse_forward), a dense block A0 (transposed when F-ordered) by GEMM."""
    if inp.X == NULL:
        sparse_forward(<const floating*> inp.data, inp.indices, inp.indptr, rows, start, n,
                       W, Z, sp.sizes[1])
    else:
        gemm(trans0, False, <int> n, <int> sp.sizes[1], <int> sp.sizes[0], <floating> 1.0,
             A0, <int> lda0, W, <int> sp.sizes[1], <floating> 0.0, Z, <int> sp.sizes[1])


cdef void _gather_rows(const Input* inp, const Py_ssize_t* rows, Py_ssize_t start,
                       Py_ssize_t n, Py_ssize_t s0, floating* Xg) noexcept nogil:
    """Xg (n, s0) <- the dense input rows rows[start], ..., rows[start + n - 1], from a
    C- or F-ordered X."""
    cdef const floating* X = <const floating*> inp.X
    cdef Py_ssize_t i, j, r
    for i in range(n):
        r = rows[start + i]
        if inp.x_fortran:
            for j in range(s0):
                Xg[i * s0 + j] = X[j * inp.ldx + r]
        else:
            memcpy(Xg + i * s0, X + r * inp.ldx, s0 * sizeof(floating))


# ---------------------------------------------------------------------------------------
# One block: forward, and optionally loss + backward.

cdef double block_pass(const Spec* sp, const Input* inp, const Py_ssize_t* rows,
                       Py_ssize_t start, Py_ssize_t n, const floating* Y, const double* sw,
                       double scale, const floating* theta, floating* grad, double* dacc,
                       floating* work, bint accumulate, floating* out_rows) noexcept nogil:
    """Run rows [start, start + n) (through ``rows`` when not NULL) through the network.

    With Y NULL (and no sparse targets in sp): forward only; the output activations are
    copied to out_rows (n, s_L).
    Otherwise returns sum_i w_i * loss_i, and, when grad is not NULL, adds this block's
    gradient to grad (dW, gemm beta = 1 when ``accumulate``, else overwriting) and to dacc
    (the intercept gradients in float64, laid out like theta's intercept part).
    """
    cdef int L = sp.n_layers
    cdef const Py_ssize_t* s = sp.sizes
    cdef Py_ssize_t s0 = s[0], lda0
    cdef bint trans0 = False
    cdef bint is_sparse = inp.X == NULL
    cdef const floating* X = <const floating*> inp.X
    cdef const floating* A0 = NULL
    cdef floating* Z
    cdef floating* D
    cdef floating* Xg = work + _xg_offset(sp)
    cdef double loss
    cdef floating beta = 1 if accumulate else 0

    # The input block A_0.
    if not is_sparse:
        if rows == NULL:
            if inp.x_fortran:
                A0 = X + start
                lda0 = inp.ldx
                trans0 = True
            else:
                A0 = X + start * inp.ldx
                lda0 = inp.ldx
        else:
            _gather_rows(inp, rows, start, n, s0, Xg)
            A0 = Xg
            lda0 = s0

    # Forward.
    _input_product(sp, inp, rows, start, n, A0, trans0, lda0, theta + sp.w_off[0],
                   work + _act_offset(sp, 1))
    forward_layers(sp, theta, work, rows, start, n, 1)

    Z = work + _act_offset(sp, L)
    if Y == NULL and sp.y_indptr == NULL:
        output_activate(Z, theta + sp.b_off[L - 1], n, s[L], sp.out)
        memcpy(out_rows, Z, n * s[L] * sizeof(floating))
        return 0.0

    loss = output_loss_backward(Z, theta + sp.b_off[L - 1], Y, sp, work + _yrow_offset(sp),
                                sw, rows, start, n, s[L], sp.out, scale,
                                dacc + (sp.b_off[L - 1] - sp.b_off[0]))
    if grad == NULL and sp.deltas == NULL and sp.input_grad == NULL:
        return loss

    # Backward: D holds Delta_l. (Without grad: only the per-sample outputs, rows given
    # by their index, as the inspection entry points ask; no dW products.)
    D = backward_layers(sp, theta, grad, dacc, work, Z, start, n, 1, accumulate)
    if sp.deltas != NULL:
        memcpy(<floating*> sp.deltas + start * s[1], D, n * s[1] * sizeof(floating))
    if grad == NULL:
        pass
    elif is_sparse:
        sparse_backward(<const floating*> inp.data, inp.indices, inp.indptr, rows,
                        start, n, D, grad + sp.w_off[0], s0, s[1], accumulate)
    else:
        # dW_1 = A_0^T D; an F-ordered A_0 is already A_0^T in row-major terms.
        gemm(not trans0, False, <int> s0, <int> s[1], <int> n, <floating> 1.0,
             A0, <int> lda0, D, <int> s[1], beta, grad + sp.w_off[0], <int> s[1])
    if sp.input_grad != NULL:  # dloss_i/dx_i = Delta_1 W_1^T
        gemm(False, True, <int> n, <int> s0, <int> s[1], <floating> 1.0,
             D, <int> s[1], theta + sp.w_off[0], <int> s[1], <floating> 0.0,
             <floating*> sp.input_grad + start * s0, <int> s0)
    return loss


cdef void forward_layers(const Spec* sp, const floating* theta, floating* work,
                         const Py_ssize_t* rows, Py_ssize_t start, Py_ssize_t n,
                         int first) noexcept nogil:
    """The forward pass on from layer ``first``, whose product Z_first (without its
    bias) is in the workspace: its bias and activation (and dropout), then every later
    layer's product, bias and activation; the output layer's product only (its bias
    and g come with the loss)."""
    cdef int L = sp.n_layers, l
    cdef const Py_ssize_t* s = sp.sizes
    cdef floating* Z
    for l in range(first, L + 1):
        Z = work + _act_offset(sp, l)
        if l > first:
            gemm(False, False, <int> n, <int> s[l], <int> s[l - 1], <floating> 1.0,
                 work + _act_offset(sp, l - 1), <int> s[l - 1], theta + sp.w_off[l - 1],
                 <int> s[l], <floating> 0.0, Z, <int> s[l])
        if l < L:
            bias_activate(Z, theta + sp.b_off[l - 1], _z_ptr(sp, work, l), n, s[l],
                          _act(sp, l), True)
            if _dropped(sp, l):
                if not _keeps_z(sp, l):
                    activation_deriv(_m_ptr(sp, work, l), Z, n, s[l], _act(sp, l))
                _drop_units(sp, Z, _m_ptr(sp, work, l), rows, start, n, l)


cdef floating* backward_layers(const Spec* sp, const floating* theta, floating* grad,
                               double* dacc, floating* work, floating* D,
                               Py_ssize_t start, Py_ssize_t n, int last,
                               bint accumulate) noexcept nogil:
    """The backward pass from the output's Delta_L in D down to layer ``last``: dW_l
    (into grad, unless NULL) and Delta_{l-1} for l = L, ..., last + 1, with the
    intercept sums added to dacc (laid out like theta's intercepts). Returns where
    Delta_last is (D itself when last is L, else one of the two scratch buffers); the
    per-sample deltas extra (sp.deltas) gets every layer's above ``last``."""
    cdef int l
    cdef const Py_ssize_t* s = sp.sizes
    cdef const floating* Aprev
    cdef floating* Dnext
    cdef floating* scratch = work + _scratch_offset(sp)
    cdef floating beta = 1 if accumulate else 0
    for l in range(sp.n_layers, last, -1):
        if sp.deltas != NULL:
            memcpy(<floating*> sp.deltas + sp.n_total * (_act_offset(sp, l) // sp.block)
                   + start * s[l], D, n * s[l] * sizeof(floating))
        Aprev = work + _act_offset(sp, l - 1)
        if grad != NULL:
            gemm(True, False, <int> s[l - 1], <int> s[l], <int> n, <floating> 1.0,
                 Aprev, <int> s[l - 1], D, <int> s[l], beta, grad + sp.w_off[l - 1],
                 <int> s[l])
        Dnext = scratch + (l % 2) * sp.block * sp.max_hidden
        gemm(False, True, <int> n, <int> s[l - 1], <int> s[l], <floating> 1.0,
             D, <int> s[l], theta + sp.w_off[l - 1], <int> s[l], <floating> 0.0,
             Dnext, <int> s[l - 1])
        # A dropping layer multiplies by its masked derivative M (any activation: a K
        # with keep_deriv is multiplied as it stands).
        activation_backward(Dnext, Aprev,
                            _m_ptr(sp, work, l - 1) if _dropped(sp, l - 1)
                            else _z_ptr(sp, work, l - 1), n, s[l - 1],
                            _act(sp, l - 1), True, dacc + (sp.b_off[l - 2] - sp.b_off[0]))
        D = Dnext
    return D


cdef double finish_gradient(const Spec* sp, const floating* theta, floating* grad,
                            const double* dacc, double scale, double alpha) noexcept nogil:
    """Write the intercept gradients and add the L2 term to the coefficient gradients.

    grad_W += alpha * scale * W; grad_b = dacc. Returns 0.5 * alpha * scale * sum ||W||^2
    (the penalty's share of the loss) in float64. grad may be NULL (loss only).
    """
    cdef Py_ssize_t i, n_coef = sp.b_off[0], n_int
    cdef double sq = 0.0
    cdef floating a = <floating> (alpha * scale)
    if alpha != 0.0:
        sq = _sum_squares(theta, n_coef)
        if grad != NULL:
            for i in range(n_coef):
                grad[i] = grad[i] + a * theta[i]
    if grad != NULL:
        n_int = sp.b_off[sp.n_layers - 1] + sp.sizes[sp.n_layers] - n_coef
        for i in range(n_int):
            grad[n_coef + i] = <floating> dacc[i]
    return 0.5 * alpha * scale * sq
