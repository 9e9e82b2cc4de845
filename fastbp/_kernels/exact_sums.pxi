# Exact, order-independent sums, and the full-batch passes built on them.
#
# Full-batch passes: threads take blocks of rows in any order; each block's results (loss,
# gradient or product, intercept sums) are added exactly (fx_add) into the thread's
# fixed-point accumulator, and the accumulators are merged exactly. So the result is
# bitwise the same for any number of threads, and for any split of the rows into chunks at
# block boundaries (Dask's chunks: each returns its accumulator, merged on the driver).
# An accumulator holds n_params + 2 entries of FXW words: the parameters, then the loss,
# then a count of values that could not be added (non-finite or beyond 2^116).
#
# Entry points, called by fastbp/_network.py and, to merge and finish chunks' sums, by
# fastbp/distributed.py: loss_grad (the objective and its gradient), forward (output
# activations; blocks are independent, nothing is summed), merge_accumulators,
# finish_loss_grad, finish_product and finish_sums (the finishes of loss_grad,
# curvature.pxi and fisher.pxi), sum_words/words_value (exact sums of sample weights),
# and max_abs (the largest |value| of X or Y, which Network.prepare checks). The cdef
# helpers are noexcept nogil and allocation-free; every buffer comes from Python, one row
# per thread.

cdef extern from *:
    """
    /* Exact, order-independent sums. A real number is held as a 256-bit two's-complement
       fixed-point value in four 64-bit words: w[0] (signed) in units of 2^64, w[1] in
       units of 1, w[2] of 2^-64 and w[3] of 2^-128. fastbp_fx_add truncates a double to
       that grid (toward zero; 2^-128 is below float32's smallest normal number) and adds
       it exactly, so a sum of per-block values is the same for any grouping and order of
       the blocks: across threads, processes and machines. Values of magnitude 2^116
       (8.3e34) or more, and non-finite ones, are refused (the caller flags the sum). */
    #include <stdint.h>
    #include <math.h>
    #define FASTBP_FX_LIMIT 8.307674973655724e34 /* 2^116: leaves room for 2^10 such terms */
    #define FASTBP_TWO64 18446744073709551616.0
    static FASTBP_INLINE int fastbp_fx_add(int64_t* w, double v) {
        double a = fabs(v);
        if (!(a < FASTBP_FX_LIMIT)) return 0;  /* NaN, infinity or too large */
        uint64_t d[4];
        double r = a / FASTBP_TWO64;  /* exact: a power of two */
        double h = floor(r);
        d[0] = (uint64_t) h;
        for (int k = 1; k < 4; k++) {  /* the fraction's bits, 64 at a time: exact */
            r = (r - h) * FASTBP_TWO64;
            h = floor(r);
            d[k] = (uint64_t) h;
        }
        uint64_t* u = (uint64_t*) w;
        if (v >= 0) {
            uint64_t carry = 0;
            for (int k = 3; k >= 0; k--) {
                uint64_t s = u[k] + d[k];
                uint64_t c = s < d[k];
                uint64_t t = s + carry;
                c += t < s;
                u[k] = t;
                carry = c;
            }
        } else {
            uint64_t borrow = 0;
            for (int k = 3; k >= 0; k--) {
                uint64_t s = u[k] - d[k];
                uint64_t b = u[k] < d[k];
                b += s < borrow;
                u[k] = s - borrow;
                borrow = b;
            }
        }
        return 1;
    }
    static FASTBP_INLINE void fastbp_fx_merge(int64_t* dst, const int64_t* src) {
        uint64_t* a = (uint64_t*) dst;
        const uint64_t* b = (const uint64_t*) src;
        uint64_t carry = 0;
        for (int k = 3; k >= 0; k--) {
            uint64_t s = a[k] + b[k];
            uint64_t c = s < b[k];
            uint64_t t = s + carry;
            c += t < s;
            a[k] = t;
            carry = c;
        }
    }
    static FASTBP_INLINE double fastbp_fx_value(const int64_t* w) {
        uint64_t u[4];
        for (int k = 0; k < 4; k++) u[k] = (uint64_t) w[k];
        int neg = w[0] < 0;
        if (neg) {  /* the magnitude: invert and add one */
            uint64_t carry = 1;
            for (int k = 3; k >= 0; k--) {
                u[k] = ~u[k] + carry;
                carry = carry && u[k] == 0;
            }
        }
        double m = (((double) u[3] / FASTBP_TWO64 + (double) u[2]) / FASTBP_TWO64
                    + (double) u[1]) + (double) u[0] * FASTBP_TWO64;
        return neg ? -m : m;
    }
    """
    bint fx_add "fastbp_fx_add"(int64_t* w, double v) noexcept nogil
    void fx_merge "fastbp_fx_merge"(int64_t* d, const int64_t* s) noexcept nogil
    double fx_value "fastbp_fx_value"(const int64_t* w) noexcept nogil


cdef enum:
    FXW = 4  # int64 words per exact value


ACC_WORDS = FXW


def accumulator_size(Py_ssize_t n_params):
    """int64 words of one exact accumulator for n_params parameters."""
    return FXW * (n_params + 2)


cdef bint _fx_block(int64_t* acc, const floating* vals, Py_ssize_t n,
                    Py_ssize_t first) noexcept nogil:
    """Add vals[:n] to entries first.. of acc; False if some value could not be added."""
    cdef Py_ssize_t i
    cdef bint ok = True
    for i in range(n):
        if not fx_add(acc + FXW * (first + i), <double> vals[i]):
            ok = False
    return ok


cdef bint _fx_block64(int64_t* acc, const double* vals, Py_ssize_t n,
                      Py_ssize_t first) noexcept nogil:
    cdef Py_ssize_t i
    cdef bint ok = True
    for i in range(n):
        if not fx_add(acc + FXW * (first + i), vals[i]):
            ok = False
    return ok


cdef void _fx_merge_threads(int64_t* acc, Py_ssize_t n_threads,
                            Py_ssize_t size) noexcept nogil:
    """Merge the accumulators of threads 1.. into thread 0's."""
    cdef Py_ssize_t t, e
    for t in range(1, n_threads):
        for e in range(size // FXW):
            fx_merge(acc + e * FXW, acc + t * size + e * FXW)


cdef bint _fx_unpack(const int64_t* acc, floating* out, double* dacc, Py_ssize_t n_coef,
                     Py_ssize_t n_int) noexcept nogil:
    """Coefficient sums into out[:n_coef] (if out), intercept sums into dacc[:n_int];
    False when the accumulator saw a value it could not add."""
    cdef Py_ssize_t i, n_params = n_coef + n_int
    if acc[FXW * (n_params + 1)] != 0:
        return False
    if out != NULL:
        for i in range(n_coef):
            out[i] = <floating> fx_value(acc + FXW * i)
    for i in range(n_int):
        dacc[i] = fx_value(acc + FXW * (n_coef + i))
    return True


cdef double _finish(const Spec* sp, const int64_t* acc, const floating* base, floating* out,
                    double* dacc, Py_ssize_t n_params, double scale, double alpha,
                    bint with_loss) noexcept nogil:
    """From a merged accumulator to the result: out = sums, with the intercept parts and
    the L2 term (alpha * scale * base on the coefficients; base is theta for a gradient,
    v for a curvature product). Returns loss * scale + penalty when with_loss. Non-finite
    sums give NaN everywhere (the solvers report divergence)."""
    cdef Py_ssize_t i, n_coef = sp.b_off[0]
    cdef double penalty
    if not _fx_unpack(acc, out, dacc, n_coef, n_params - n_coef):
        if out != NULL:
            for i in range(n_params):
                out[i] = <floating> NAN
        return NAN
    penalty = finish_gradient(sp, base, out, dacc, scale, alpha)
    if with_loss:
        return fx_value(acc + FXW * n_params) * scale + penalty
    return 0.0


cdef int _check_exact_buffers(Py_ssize_t n_params, Py_ssize_t n_int, int n_threads,
                              floating[:, ::1] work, floating[:, ::1] tgrad,
                              double[:, ::1] tdacc, int64_t[:, ::1] acc) except -1:
    """The per-thread buffers of an exact full-batch pass fit the network and threads."""
    if tgrad.shape[1] != n_params or tdacc.shape[1] != n_int \
            or acc.shape[1] != FXW * (n_params + 2) or work.shape[0] < n_threads \
            or tgrad.shape[0] < n_threads or tdacc.shape[0] < n_threads \
            or acc.shape[0] < n_threads:
        raise ValueError("thread buffers or accumulators do not match")
    return 0


def loss_grad(const floating[::1] theta, floating[::1] grad, const floating[:, :] X,
              const floating[::1] data, const int[::1] indices,
              const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
              const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
              const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
              const int[::1] acts, int out, floating[:, ::1] work, floating[:, ::1] tgrad,
              double[:, ::1] tdacc, int64_t[:, ::1] acc, Py_ssize_t block, double scale, double alpha,
              int n_threads, bint finish=True,
              const floating[::1] y_data=None, const int[::1] y_indices=None,
              const Py_ssize_t[::1] y_indptr=None):
    """Full-batch objective over all rows, streamed in blocks; returns the loss (float).

    grad (n_params,) is overwritten, or left alone when None. scale = 1 / sum(weights).
    acts holds one activation code (``ACTIVATIONS``' values, C int) per hidden layer.
    X is dense (and data/indices/indptr None) or None (and they hold CSR arrays); so are
    the targets: Y dense, or None and y_data/y_indices/y_indptr CSR arrays (read one row
    at a time, never densified whole; the other entry points take them alike).
    work, tgrad (n_params), tdacc (n_intercepts) and acc (accumulator_size) have one row
    per thread. The exact sums end in acc[0]; with ``finish`` False they are left there
    (for merging with other chunks' sums, then ``finish_loss_grad``) and 0 is returned.
    BLAS must be single-threaded while n_threads > 1 (the caller sees to it).
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = _n_rows(Y, y_indptr), n_params = theta.shape[0]
    cdef Py_ssize_t n_blocks = (n + block - 1) // block
    cdef Py_ssize_t n_int = tdacc.shape[1], ws = work.shape[1], n_coef = b_off[0]
    cdef Py_ssize_t asz = acc.shape[1]
    cdef double result = 0.0
    cdef floating* g = NULL
    cdef const double* sw = NULL
    cdef const floating* theta_p = &theta[0]
    cdef const floating* Y_p = NULL
    cdef floating* work_p = &work[0, 0]
    cdef floating* tg = &tgrad[0, 0]
    cdef double* td = &tdacc[0, 0]
    cdef int64_t* acc_p = &acc[0, 0]
    # Thread-private:
    cdef Py_ssize_t b, start, nb
    cdef double part
    cdef bint ok
    cdef int tid
    _check_exact_buffers(n_params, n_params - n_coef, n_threads, work, tgrad, tdacc, acc)
    if ws < workspace_size(sizes, acts, block, False):
        raise ValueError("the workspace is too small")
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, block, X, data, indices, indptr, theta)
    _fill_targets(&sp, Y, y_data, y_indices, y_indptr, &Y_p)
    if grad is not None:
        g = &grad[0]
    if sample_weight is not None:
        sw = &sample_weight[0]
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        memset(acc_p + tid * asz, 0, asz * sizeof(int64_t))
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            nb = min(block, n - start)
            memset(td + tid * n_int, 0, n_int * sizeof(double))
            part = block_pass(&sp, &inp, NULL, start, nb, Y_p, sw, scale, theta_p,
                              (tg + tid * n_params) if g != NULL else NULL,
                              td + tid * n_int, work_p + tid * ws, False, NULL)
            ok = fx_add(acc_p + tid * asz + FXW * n_params, part)
            if g != NULL:
                ok = _fx_block(acc_p + tid * asz, tg + tid * n_params, n_coef, 0) and ok
                ok = _fx_block64(acc_p + tid * asz, td + tid * n_int, n_int, n_coef) and ok
            if not ok:
                acc_p[tid * asz + FXW * (n_params + 1)] += 1
    with nogil:
        _fx_merge_threads(acc_p, n_threads, asz)
        if finish:
            result = _finish(&sp, acc_p, theta_p, g, td, n_params, scale, alpha, True)
    return result


def merge_accumulators(int64_t[::1] total, const int64_t[::1] part):
    """total += part, exactly (accumulators of the same size)."""
    cdef Py_ssize_t i
    if total.shape[0] != part.shape[0] or total.shape[0] % FXW:
        raise ValueError("accumulators differ in size")
    with nogil:
        for i in range(total.shape[0] // FXW):
            fx_merge(&total[i * FXW], &part[i * FXW])


def finish_loss_grad(const int64_t[::1] acc, const floating[::1] theta, floating[::1] grad,
                     double[::1] dacc, const Py_ssize_t[::1] sizes,
                     const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
                     double scale, double alpha):
    """Loss (returned) and gradient (into grad, unless None) from merged exact sums, as
    ``loss_grad`` finishes them. dacc: scratch of n_intercepts float64."""
    cdef Spec sp
    cdef Py_ssize_t n_params = theta.shape[0]
    cdef floating* g = NULL
    if acc.shape[0] != FXW * (n_params + 2) or dacc.shape[0] < n_params - b_off[0]:
        raise ValueError("accumulator or scratch does not match theta")
    _fill_spec(&sp, sizes, w_off, b_off, None, 0, 1)
    if grad is not None:
        g = &grad[0]
    return _finish(&sp, &acc[0], &theta[0], g, &dacc[0], n_params, scale, alpha, True)


def finish_product(const int64_t[::1] acc, const floating[::1] v, floating[::1] out_arr,
                   double[::1] dacc, const Py_ssize_t[::1] sizes,
                   const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, double scale,
                   double alpha):
    """A curvature product (into out_arr) from merged exact sums, as
    ``curvature_product`` finishes it (with the L2 term alpha * scale * v)."""
    cdef Spec sp
    cdef Py_ssize_t n_params = v.shape[0]
    if acc.shape[0] != FXW * (n_params + 2) or out_arr.shape[0] != n_params \
            or dacc.shape[0] < n_params - b_off[0]:
        raise ValueError("accumulator, output or scratch does not match v")
    _fill_spec(&sp, sizes, w_off, b_off, None, 0, 1)
    _finish(&sp, &acc[0], &v[0], &out_arr[0], &dacc[0], n_params, scale, alpha, False)


def finish_sums(const int64_t[::1] acc, floating[::1] out_arr):
    """Plain sums (the Fisher diagonal) into out_arr from merged exact sums."""
    cdef Py_ssize_t i, n_params = out_arr.shape[0]
    if acc.shape[0] != FXW * (n_params + 2):
        raise ValueError("accumulator does not match the output")
    with nogil:
        if acc[FXW * (n_params + 1)] != 0:
            for i in range(n_params):
                out_arr[i] = <floating> NAN
        else:
            for i in range(n_params):
                out_arr[i] = <floating> fx_value(&acc[FXW * i])


def forward(const floating[::1] theta, floating[:, ::1] out_arr, const floating[:, :] X,
            const floating[::1] data, const int[::1] indices,
            const Py_ssize_t[::1] indptr, const Py_ssize_t[::1] sizes,
            const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
            const int[::1] acts, int out, floating[:, ::1] work, Py_ssize_t block,
            int n_threads):
    """Output activations for every row into out_arr (n_samples, n_outputs).

    Blocks are independent: threads take blocks; work is (n_threads, workspace).
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = out_arr.shape[0], m = out_arr.shape[1]
    cdef Py_ssize_t n_blocks = (n + block - 1) // block, ws = work.shape[1]
    cdef floating* work_p = &work[0, 0]
    cdef floating* out_p
    cdef const floating* theta_p = &theta[0]
    cdef Py_ssize_t b, start, nb
    cdef int tid
    if work.shape[0] < n_threads:
        raise ValueError("work needs one row per thread")
    if ws < workspace_size(sizes, acts, block, False):
        raise ValueError("the workspace is too small")
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, block, X, data, indices, indptr, theta)
    if n == 0:
        return
    out_p = &out_arr[0, 0]
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for b in prange(n_blocks, schedule="static"):
            start = b * block
            nb = min(block, n - start)
            block_pass(&sp, &inp, NULL, start, nb, <const floating*> NULL, NULL, 1.0,
                       theta_p, NULL, NULL, work_p + tid * ws, False, out_p + start * m)


def sum_words(const double[::1] x):
    """The exact sum of x as accumulator words (int64[4]); see ``words_value``.

    Sums of parts merge exactly (``merge_accumulators``), so a sum over chunks equals the
    sum over all values, bitwise.
    """
    out = np.zeros(FXW, dtype=np.int64)
    cdef int64_t[::1] w = out
    cdef Py_ssize_t i
    cdef bint ok = True
    with nogil:
        for i in range(x.shape[0]):
            if not fx_add(&w[0], x[i]):
                ok = False
    if not ok:
        raise ValueError("values must be finite and below 2**116 in magnitude")
    return out


def words_value(const int64_t[::1] w):
    """The float nearest (to rounding) the exact sum held in accumulator words."""
    if w.shape[0] != FXW:
        raise ValueError(f"an exact sum has {FXW} words")
    return fx_value(&w[0])


# ---------------------------------------------------------------------------------------
# The largest |value| of an input, in one pass (Network.prepare's check of X and Y).

cdef extern from *:
    """
    /* max |a[i]| over n values, NaN when one is NaN. With the sign bit cleared, the bits
       of floats order as unsigned integers as their values do, and every NaN lies above
       infinity: an integer maximum (which vectorizes, where a float one does not without
       reordering comparisons) of the cleared bits is the bits of max |a|, or of a NaN. */
    #include <string.h>
    #include <stdint.h>
    static double fastbp_max_abs_f(const float* a, Py_ssize_t n) {
        uint32_t top = 0, u;
        float f;
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            memcpy(&u, a + i, sizeof u);
            u &= 0x7fffffffu;
            top = u > top ? u : top;
        }
        memcpy(&f, &top, sizeof f);
        return f;
    }
    static double fastbp_max_abs_d(const double* a, Py_ssize_t n) {
        int64_t top = 0, u;   /* non-negative once the sign is cleared: signed compares */
        double f;
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            memcpy(&u, a + i, sizeof u);
            u &= INT64_MAX;
            top = u > top ? u : top;
        }
        memcpy(&f, &top, sizeof f);
        return f;
    }
    """
    double fastbp_max_abs_f(const float* a, Py_ssize_t n) noexcept nogil
    double fastbp_max_abs_d(const double* a, Py_ssize_t n) noexcept nogil


def max_abs(const floating[::1] a):
    """max |a| over a contiguous array, in one pass: NaN when a holds a NaN, infinity
    when it holds an infinity (and no NaN), 0.0 when empty. One thread: the pass is
    bound by memory, and a parallel region here, ahead of a fit's own team, made some
    processes' whole fits slower (1.5x on an adam-mnist-like fit in 4 of 21 processes)."""
    cdef Py_ssize_t n = a.shape[0]
    cdef double top
    if n == 0:
        return 0.0
    with nogil:
        if floating is float:
            top = fastbp_max_abs_f(&a[0], n)
        else:
            top = fastbp_max_abs_d(&a[0], n)
    return top


def column_sums(const floating[:, ::1] W, double[::1] abs_sums, double[::1] sq_sums):
    """Per column j of W (rows, cols): abs_sums[j] = sum_i |W[i, j]| and sq_sums[j] =
    sum_i W[i, j]^2, in float64, rows added in order. One pass over W, vectorized
    across the columns, with no temporary: the parameters' bound check
    (Network.loss_is_surely_finite) on wide layers. A NaN or infinity in a column makes
    both of its sums NaN or infinite."""
    cdef Py_ssize_t i, j, rows = W.shape[0], cols = W.shape[1]
    cdef const floating* w
    cdef double v
    if abs_sums.shape[0] != cols or sq_sums.shape[0] != cols:
        raise ValueError("abs_sums and sq_sums need one entry per column of W")
    if cols == 0:
        return
    with nogil:
        memset(&abs_sums[0], 0, cols * sizeof(double))
        memset(&sq_sums[0], 0, cols * sizeof(double))
        for i in range(rows):
            w = &W[i, 0]
            for j in range(cols):
                v = w[j]
                abs_sums[j] += fabs(v)
                sq_sums[j] += v * v
