# What this variant is, and hooks for tests and benchmarks; none is on a training path.
#
#   build_info           the widest vector ISA this variant was compiled for, and its
#                        OpenMP version (fastbp/_config.py's show_config, _threads.py)
#   openmp_max_threads   OpenMP's default thread count (_config.py, _threads.py)
#   gemm_rowmajor        the kernels' own GEMM entry point (tests/test_small_gemm.py)
#   gemm_cut             how that entry point cuts a product it sends to BLAS (same)
#   gemm_only            exactly loss_grad's GEMM calls and nothing else: the floor of
#                        one loss_grad call (benchmarks/bench_loss_grad.py)
#   vmath_float32        the float math of _vmath.h over an array, in a loop that
#                        vectorizes as the layer kernels' do (tests/test_vmath.py)
#   vmath_exp_float64    its double exp, the same way (same)

cdef extern from *:
    """
    /* The widest vector ISA the compiler was allowed to use for this variant. */
    #if defined(__AVX512F__)
    #define FASTBP_ISA "avx512"
    #elif defined(__AVX2__)
    #define FASTBP_ISA "avx2"
    #else
    #define FASTBP_ISA "baseline"
    #endif
    """
    const char* COMPILED_ISA "FASTBP_ISA"


def build_info():
    """The widest vector ISA this variant was compiled for, and its OpenMP version (0:
    built without OpenMP)."""
    return {"isa": COMPILED_ISA.decode(), "openmp": OPENMP_VERSION}


def openmp_max_threads():
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl's limits."""
    return omp_get_max_threads()


def set_small_products(bint own_loops):
    """Whether the kernels compute small products (see ``_small_gemm.h``) in fastbp's own
    loops (True) or in BLAS (False). Process-wide; ``fastbp._threads`` sets it once at
    import. Not for use while a computation runs: its later products would change path."""
    set_small_gemm(own_loops)


def small_products_in_own_loops():
    """True when the kernels compute small products in fastbp's own loops, False when
    they leave every product to BLAS."""
    return bool(small_gemm_enabled())


def gemm_rowmajor(bint trans_a, bint trans_b, const floating[:, ::1] A,
                  const floating[:, ::1] B, floating[:, ::1] C, double beta):
    """C = op(A) @ op(B) + beta * C through the kernels' own GEMM entry point (BLAS, or
    the small-product loops of _small_gemm.h when the shape qualifies); for tests.
    Returns whether the small-product path was taken."""
    cdef int m = C.shape[0], n = C.shape[1]
    cdef int k = A.shape[0] if trans_a else A.shape[1]
    if (A.shape[1] if trans_a else A.shape[0]) != m or \
            (B.shape[0] if trans_b else B.shape[1]) != n or \
            (B.shape[1] if trans_b else B.shape[0]) != k:
        raise ValueError("shapes do not match")
    if m == 0 or n == 0 or k == 0:
        raise ValueError("empty operands")
    cdef bint small = (beta == 0 or beta == 1) and small_gemm_ok(
        trans_a, trans_b, m, n, k, sizeof(floating))
    with nogil:
        gemm(trans_a, trans_b, m, n, k, <floating> 1.0, &A[0, 0], <int> A.shape[1],
             &B[0, 0], <int> B.shape[1], <floating> beta, &C[0, 0], n)
    return small


def gemm_cut(bint trans_a, bint trans_b, int m, int n, int k):
    """How the GEMM entry point cuts an (m, n, k) product that it sends to BLAS, for
    BLAS's small-matrix kernels (see _blas.pxd): ``(kind, piece)`` with kind 'rows' (the
    rows of C), 'rows, B transposed' (the same, op(B) = B^T copied first), 'depth' (k)
    or None, and the length of the pieces (0 for None)."""
    if m <= 0 or n <= 0 or k <= 0:
        raise ValueError("m, n and k must be positive")
    cdef int piece = 0
    cdef int cut = blas_cut(trans_a, trans_b, m, n, k, &piece)
    return {CUT_ROWS: "rows", CUT_DEPTH: "depth",
            CUT_ROWS_BT: "rows, B transposed"}.get(cut), piece


cdef void _block_gemms(const Spec* sp, const floating* X, Py_ssize_t start, Py_ssize_t nb,
                       const floating* theta, floating* grad, floating* work,
                       bint accumulate) noexcept nogil:
    """Exactly the GEMM calls that block_pass makes for one dense C-ordered block."""
    cdef int L = sp.n_layers, l
    cdef const Py_ssize_t* s = sp.sizes
    cdef floating* scratch = work + _scratch_offset(sp)
    cdef floating beta = 1 if accumulate else 0
    cdef const floating* A0 = X + start * s[0]
    for l in range(1, L + 1):
        gemm(False, False, <int> nb, <int> s[l], <int> s[l - 1], <floating> 1.0,
             A0 if l == 1 else (work + _act_offset(sp, l - 1)), <int> s[l - 1],
             theta + sp.w_off[l - 1], <int> s[l], <floating> 0.0,
             work + _act_offset(sp, l), <int> s[l])
    for l in range(L, 0, -1):
        gemm(True, False, <int> s[l - 1], <int> s[l], <int> nb, <floating> 1.0,
             A0 if l == 1 else (work + _act_offset(sp, l - 1)), <int> s[l - 1],
             work + _act_offset(sp, l), <int> s[l], beta, grad + sp.w_off[l - 1], <int> s[l])
        if l > 1:
            gemm(False, True, <int> nb, <int> s[l - 1], <int> s[l], <floating> 1.0,
                 work + _act_offset(sp, l), <int> s[l], theta + sp.w_off[l - 1], <int> s[l],
                 <floating> 0.0, scratch + (l % 2) * sp.block * sp.max_hidden,
                 <int> s[l - 1])


def gemm_only(const floating[::1] theta, const floating[:, ::1] X,
              const Py_ssize_t[::1] sizes, const Py_ssize_t[::1] w_off,
              floating[:, ::1] work, floating[:, ::1] tgrad, Py_ssize_t block,
              int n_threads):
    """Run exactly the GEMM calls that ``loss_grad`` makes on dense C-ordered X, with the
    same blocks, threads and buffers, and nothing else. For benchmarks: the floor of one
    loss_grad call. Buffers as for loss_grad."""
    cdef Spec sp
    cdef Py_ssize_t n = X.shape[0], n_params = theta.shape[0], ws = work.shape[1]
    cdef Py_ssize_t n_blocks = (n + block - 1) // block
    cdef const floating* X_p = &X[0, 0]
    cdef const floating* theta_p = &theta[0]
    cdef floating* work_p = &work[0, 0]
    cdef floating* tg = &tgrad[0, 0]
    cdef int tid
    cdef Py_ssize_t b, start
    if work.shape[0] < n_threads or tgrad.shape[0] < n_threads:
        raise ValueError("thread buffers do not match")
    _fill_spec(&sp, sizes, w_off, w_off, None, 0, block)
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            _block_gemms(&sp, X_p, start, min(block, n - start), theta_p,
                         tg + tid * n_params, work_p + tid * ws, False)


VMATH = ("exp", "expm1", "log1p", "tanh", "normal_cdf", "normal_pdf", "softplus",
         "softplus_deriv", "sigmoid")


def vmath_float32(str name, const float[::1] x, float[::1] out):
    """out[i] = f(x[i]) for f one of the float32 functions of _vmath.h named in VMATH,
    each in its own loop that the compiler vectorizes, as the layer kernels' loops are.
    For tests: their accuracy and special values."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef int code
    cdef float aux
    if name not in VMATH:
        raise ValueError(f"name must be one of {', '.join(VMATH)}, got {name!r}")
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} elements, x has {n}")
    code = VMATH.index(name)
    with nogil:
        if code == 0:
            for i in range(n):
                out[i] = fbp_expf(x[i])
        elif code == 1:
            for i in range(n):
                out[i] = fbp_expm1f(x[i])
        elif code == 2:
            for i in range(n):
                out[i] = fbp_log1pf(x[i])
        elif code == 3:
            for i in range(n):
                out[i] = fbp_tanhf(x[i])
        elif code == 4:
            for i in range(n):
                out[i] = fbp_ncdff(x[i], &aux)
        elif code == 5:
            for i in range(n):
                fbp_ncdff(x[i], &aux)
                out[i] = aux
        elif code == 6:
            for i in range(n):
                out[i] = fbp_softplusf(x[i], &aux)
        elif code == 7:
            for i in range(n):
                fbp_softplusf(x[i], &aux)
                out[i] = aux
        else:
            for i in range(n):
                out[i] = fbp_sigmoidf(x[i])


def vmath_exp_float64(const double[::1] x, double[::1] out):
    """out[i] = exp(x[i]) by _vmath.h's fbp_exp, in a loop that the compiler vectorizes as
    the layer kernels' loops are. For tests: its accuracy and special values."""
    cdef Py_ssize_t i, n = x.shape[0]
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} elements, x has {n}")
    with nogil:
        for i in range(n):
            out[i] = fbp_exp(x[i])
