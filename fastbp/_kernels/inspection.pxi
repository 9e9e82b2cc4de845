# Per-sample error contributions: the backpropagated deltas and the input gradients,
# the quantities backpropagation is defined by, for inspection (saliency) rather than
# training. For rows i of X with targets Y and weights w (1 without them):
#
#   deltas       Delta_l[i] = w_i dloss_i/dz_l[i]    (n, s_l) for every layer l = 1..L
#   input_grad   w_i dloss_i/dx_i = Delta_1[i] W_1^T   (n, s_0), dense also for CSR X
#
# before the 1/sum(w) averaging of the objective. They come from block_pass itself (its
# Spec's ``deltas``/``input_grad`` outputs, rows landing at their own index), run with
# scale 1 and without the dW products, over blocks of rows shared by threads as in
# ``loss_grad``: each row's values depend on that row only, so any block size and thread
# count give the same numbers. Called by fastbp/_network.py (Network.deltas,
# Network.input_gradient).

def layer_deltas(const floating[::1] theta, const floating[:, :] X,
                 const floating[::1] data, const int[::1] indices,
                 const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
                 const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
                 const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
                 const int[::1] acts, int out, floating[:, ::1] work, double[:, ::1] dacc,
                 floating[::1] deltas_out, floating[:, ::1] input_grad, Py_ssize_t block,
                 int n_threads,
                 const floating[::1] y_data=None, const int[::1] y_indices=None,
                 const Py_ssize_t[::1] y_indptr=None):
    """Per-sample deltas (into ``deltas_out``: layer l's (n, s_l) row-major block after
    layer l-1's, or None) and input gradients (``input_grad`` (n, s_0), or None).

    ``work`` (n_threads, workspace_size(sizes, acts, block, False)) and ``dacc``
    (n_threads, n_intercepts) are per-thread scratch.
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = _n_rows(Y, y_indptr), n_blocks, ws = work.shape[1], n_int = dacc.shape[1]
    cdef Py_ssize_t total = 0, l, b, start, nb
    cdef floating* work_p
    cdef double* dacc_p
    cdef const double* sw = NULL
    cdef const floating* theta_p = &theta[0]
    cdef const floating* Y_p
    cdef int tid
    if block < 1:
        raise ValueError("block must be positive")
    if work.shape[0] < n_threads or dacc.shape[0] < n_threads:
        raise ValueError("work and dacc need one row per thread")
    if ws < workspace_size(sizes, acts, block, False):
        raise ValueError("the workspace is too small")
    if n_int != theta.shape[0] - b_off[0]:
        raise ValueError("dacc rows must hold the intercepts")
    for l in range(1, sizes.shape[0]):
        total += sizes[l]
    if deltas_out is not None and deltas_out.shape[0] != n * total:
        raise ValueError(f"deltas_out needs {n * total} elements")
    if input_grad is not None and (input_grad.shape[0] != n
                                   or input_grad.shape[1] != sizes[0]):
        raise ValueError("input_grad must be (n_samples, n_features)")
    if sample_weight is not None and sample_weight.shape[0] != n:
        raise ValueError("sample_weight needs one weight per row")
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, block, X, data, indices, indptr, theta)
    _fill_targets(&sp, Y, y_data, y_indices, y_indptr, &Y_p)
    if n == 0:
        return
    sp.n_total = n
    if deltas_out is not None:
        sp.deltas = &deltas_out[0]
    if input_grad is not None:
        sp.input_grad = &input_grad[0, 0]
    if sample_weight is not None:
        sw = &sample_weight[0]
    work_p = &work[0, 0]
    dacc_p = &dacc[0, 0]
    n_blocks = (n + block - 1) // block
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for b in prange(n_blocks, schedule="static"):
            start = b * block
            nb = min(block, n - start)
            block_pass(&sp, &inp, NULL, start, nb, Y_p, sw, 1.0, theta_p,
                       <floating*> NULL, dacc_p + tid * n_int, work_p + tid * ws, False,
                       NULL)


def dropout_keep(unsigned long long seed, const uint64_t[::1] rows, int layer,
                 Py_ssize_t units, double rate):
    """Dropout's kept-unit mask (len(rows), units) for hidden ``layer`` (1-based) in the
    epoch of ``seed``, for rows with these keys: the draws run_epoch makes, for tests."""
    out = np.zeros((rows.shape[0], units), dtype=np.bool_)
    cdef unsigned char[:, ::1] o = out.view(np.uint8)
    cdef Py_ssize_t i, j
    for i in range(rows.shape[0]):
        for j in range(units):
            o[i, j] = _keep_unit(seed, rows[i], layer, j, rate)
    return out
