# Diagonal of the empirical Fisher: sum_i s w_i (grad of loss_i)^2, for Hessian-free's
# preconditioner (fisher_diag, called by fastbp/_network.py's Network._fisher, which
# _objective.py hands to _hessian_free.py). No L2 term.
#
# For one layer the per-sample gradient of W is the outer product a_i (x) delta_i, so its
# square is a_i^2 (x) delta_i^2 and the sum over a block is one GEMM, (A .* A)^T (D .* D),
# with the row factor c_i folded into the first operand. With D_l the deltas of
# scale * w_i * loss_i (block_pass computes Delta_L) and c_i = 1 / (scale * w_i):
#   diag_W_l = (c .* A_{l-1} .* A_{l-1})^T (D_l .* D_l),   diag_b_l = c^T (D_l .* D_l)
#
# Blocks are summed with exact_sums.pxi's accumulators: bitwise the same for any thread
# count. block_fisher is noexcept nogil and allocates nothing.

def fisher_workspace_size(const Py_ssize_t[::1] sizes, const int[::1] acts,
                          Py_ssize_t block):
    """Elements of one thread's workspace for ``fisher_diag`` over ``block`` rows: the
    gradient pass's (``workspace_size``, the kept Zs included), then A .* A and D .* D."""
    cdef Py_ssize_t widest = 1, l
    for l in range(sizes.shape[0]):
        if sizes[l] > widest:
            widest = sizes[l]
    return workspace_size(sizes, acts, block, False) + 2 * block * widest


cdef inline double _row_factor(const double* sw, Py_ssize_t r, double scale) noexcept nogil:
    """1 / (scale * w_r), or 0 for a zero weight (whose row contributes nothing)."""
    cdef double w = sw[r] if sw != NULL else 1.0
    return 1.0 / (scale * w) if w > 0 else 0.0


cdef void block_fisher(const Spec* sp, const Input* inp, Py_ssize_t start, Py_ssize_t n,
                       const floating* Y, const double* sw, double scale,
                       const floating* theta, floating* diag, double* sink,
                       floating* work) noexcept nogil:
    """Add rows [start, start + n)'s sum_i c_i g_i^2 to diag (n_params,).

    g_i is row i's gradient of scale * w_i * loss_i, and c_i = 1 / (scale * w_i), so the
    sum is sum_i scale * w_i * (grad loss_i)^2. sink (n_intercepts,) absorbs the column
    sums that the shared forward/backward helpers produce.
    """
    cdef int L = sp.n_layers, l
    cdef const Py_ssize_t* s = sp.sizes
    cdef Py_ssize_t i, j, p, r, m, k, widest = 1
    cdef floating* D = work + _act_offset(sp, L)
    cdef floating* Dnext
    cdef floating* scratch = work + _scratch_offset(sp)
    cdef floating* Asq
    cdef floating* Dsq
    cdef floating* fb
    cdef floating* fw
    cdef const floating* A
    cdef const floating* X = <const floating*> inp.X
    cdef const floating* xdata = <const floating*> inp.data
    cdef floating c, t
    for l in range(L + 1):
        if s[l] > widest:
            widest = s[l]
    Asq = scratch + 2 * sp.block * sp.max_hidden
    Dsq = Asq + sp.block * widest
    # Forward, and Delta_L (scaled by scale * w_i) in place of the output pre-activations.
    block_pass(sp, inp, NULL, start, n, Y, sw, scale, theta, <floating*> NULL, sink,
               work, False, <floating*> NULL)
    for l in range(L, 0, -1):
        m = s[l]
        k = s[l - 1]
        fb = diag + sp.b_off[l - 1]
        fw = diag + sp.w_off[l - 1]
        for i in range(n):
            c = <floating> _row_factor(sw, start + i, scale)
            for j in range(m):
                t = D[i * m + j] * D[i * m + j]
                Dsq[i * m + j] = t
                fb[j] = fb[j] + c * t
        if l == 1 and X == NULL:
            for i in range(n):
                c = <floating> _row_factor(sw, start + i, scale)
                r = start + i
                for p in range(inp.indptr[r], inp.indptr[r + 1]):
                    t = c * xdata[p] * xdata[p]
                    for j in range(m):
                        fw[<Py_ssize_t> inp.indices[p] * m + j] += t * Dsq[i * m + j]
        else:
            for i in range(n):
                c = <floating> _row_factor(sw, start + i, scale)
                for j in range(k):
                    if l > 1:
                        t = work[_act_offset(sp, l - 1) + i * k + j]
                    elif inp.x_fortran:
                        t = X[j * inp.ldx + start + i]
                    else:
                        t = X[(start + i) * inp.ldx + j]
                    Asq[i * k + j] = c * t * t
            gemm(True, False, <int> k, <int> m, <int> n, <floating> 1.0, Asq, <int> k,
                 Dsq, <int> m, <floating> 1.0, fw, <int> m)
        if l > 1:
            Dnext = scratch + (l % 2) * sp.block * sp.max_hidden
            gemm(False, True, <int> n, <int> k, <int> m, <floating> 1.0, D, <int> m,
                 theta + sp.w_off[l - 1], <int> m, <floating> 0.0, Dnext, <int> k)
            activation_backward(Dnext, work + _act_offset(sp, l - 1),
                                _z_ptr(sp, work, l - 1), n, k, _act(sp, l - 1), True,
                                sink + (sp.b_off[l - 2] - sp.b_off[0]))
            D = Dnext


def fisher_diag(const floating[::1] theta, floating[::1] out_arr, const floating[:, :] X,
                const floating[::1] data, const int[::1] indices,
                const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
                const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
                const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
                const int[::1] acts, int out, floating[:, ::1] work,
                floating[:, ::1] tgrad, double[:, ::1] tdacc, int64_t[:, ::1] acc,
                Py_ssize_t block, double scale, int n_threads, bint finish=True,
                const floating[::1] y_data=None, const int[::1] y_indices=None,
                const Py_ssize_t[::1] y_indptr=None):
    """Diagonal of the empirical Fisher, sum_i scale * w_i * (grad loss_i)^2, into out_arr.

    No L2 term. Blocks, threads, buffers and exact sums as in ``loss_grad`` (``finish``
    False leaves the sums in acc[0], see ``finish_sums``); work is
    (n_threads, fisher_workspace_size(sizes, block)).
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = _n_rows(Y, y_indptr), n_params = theta.shape[0]
    cdef Py_ssize_t n_blocks = (n + block - 1) // block
    cdef Py_ssize_t n_int = tdacc.shape[1], ws = work.shape[1]
    cdef Py_ssize_t asz = acc.shape[1]
    cdef const double* sw = NULL
    cdef const floating* theta_p = &theta[0]
    cdef const floating* Y_p = NULL
    cdef floating* work_p = &work[0, 0]
    cdef floating* tg = &tgrad[0, 0]
    cdef double* td = &tdacc[0, 0]
    cdef int64_t* acc_p = &acc[0, 0]
    cdef int tid
    cdef Py_ssize_t b, start
    if out_arr.shape[0] != n_params or ws < fisher_workspace_size(sizes, acts, block):
        raise ValueError("output or workspace does not match")
    _check_exact_buffers(n_params, n_int, n_threads, work, tgrad, tdacc, acc)
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, block, X, data, indices, indptr, theta)
    _fill_targets(&sp, Y, y_data, y_indices, y_indptr, &Y_p)
    if sample_weight is not None:
        sw = &sample_weight[0]
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        memset(acc_p + tid * asz, 0, asz * sizeof(int64_t))
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            memset(tg + tid * n_params, 0, n_params * sizeof(floating))
            memset(td + tid * n_int, 0, n_int * sizeof(double))
            block_fisher(&sp, &inp, start, min(block, n - start), Y_p, sw, scale,
                         theta_p, tg + tid * n_params, td + tid * n_int,
                         work_p + tid * ws)
            if not _fx_block(acc_p + tid * asz, tg + tid * n_params, n_params, 0):
                acc_p[tid * asz + FXW * (n_params + 1)] += 1
    with nogil:
        _fx_merge_threads(acc_p, n_threads, asz)
    if finish:
        finish_sums(acc[0], out_arr)
