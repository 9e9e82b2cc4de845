# Row-major level-3 BLAS on the fused ``floating`` type, through SciPy's BLAS.
#
# Every matrix in fastbp is row-major (C order). A row-major (m, n) matrix is the
# column-major (n, m) matrix of its transpose, so C = op(A) op(B) in row-major order is
# C^T = op(B)^T op(A)^T in column-major order: swap the operands, keep the flags. No
# transposed copies are ever made.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef extern from "_small_gemm.h" nogil:
    void set_small_gemm "fastbp_set_small_gemm"(int on)
    int small_gemm_enabled "fastbp_small_gemm_enabled"()
    bint small_gemm_ok "fastbp_small_gemm_ok"(int trans_a, int trans_b, int m, int n, int k,
                                              size_t itemsize)
    void small_sgemm "fastbp_small_sgemm"(int trans_a, int trans_b, int m, int n, int k,
                                          const float* A, int lda, const float* B, int ldb,
                                          int accumulate, float* C, int ldc)
    void small_dgemm "fastbp_small_dgemm"(int trans_a, int trans_b, int m, int n, int k,
                                          const double* A, int lda, const double* B,
                                          int ldb, int accumulate, double* C, int ldc)


# OpenBLAS (0.3.17 and later, on its SkylakeX, Cooperlake and SapphireRapids cores) runs
# a product on its small-matrix kernels, which neither pack the operands nor clear C
# first, when M * N * K <= 100^3 in its column-major terms and, for a transposed first
# operand, when K >= 32 and M * N <= 1200 (K >= 4 when both are transposed). When small
# products go to BLAS (fastbp's own loops are off, see _threads.small_products), a larger
# product whose other two sides are small is cut into pieces that qualify: along the
# rows of C (a block of rows times small weights), or along k (a weight gradient summed
# over a block of rows), the pieces after the first added with beta = 1. Measured on an
# AVX-512 Xeon, one thread, 2048-row float64 products of a 64-64-10 network, full against
# cut: 64x64 forward 286 against 228 us, 10 outputs 97 against 50, their weight gradients
# 363 against 282 and 116 against 57, the delta through the 10 outputs (by a copied W^T)
# 70 against about 50. The cut depends only on the shapes, so results do not depend on
# timings, threads or the row blocks' order.
cdef enum:
    BLAS_SMALL_MNK = 1000000
    MIN_PIECE = 64
    # A product by the transpose of a matrix of at most this many elements (32 KiB in
    # float64), such as D W^T through a small layer, is computed by W^T copied to the
    # stack: OpenBLAS's small kernels refuse a transposed first operand with k < 32.
    TRANSPOSE_MAX = 4096


cdef inline bint _blas_small(bint cm_ta, bint cm_tb, double M, double N,
                             double K) noexcept nogil:
    """Whether OpenBLAS takes its small-matrix path for this column-major product."""
    if M * N * K > BLAS_SMALL_MNK:
        return False
    if cm_ta and cm_tb:
        return K >= 4
    if cm_ta:
        return M * N <= 1200 and K >= 32
    return True


cdef inline void _blas_gemm(bint trans_a, bint trans_b, int m, int n, int k,
                            floating alpha, const floating* A, int lda,
                            const floating* B, int ldb,
                            floating beta, floating* C, int ldc) noexcept nogil:
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> B, &ldb, <float*> A, &lda,
              &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> B, &ldb, <double*> A, &lda,
              &beta, C, &ldc)


cdef inline int _piece(int total, double per_unit) noexcept nogil:
    """The length of the fewest equal pieces of ``total`` within BLAS_SMALL_MNK (per_unit:
    the product of the other two sides), or 0 when they would be under MIN_PIECE."""
    cdef double most = BLAS_SMALL_MNK / per_unit
    cdef Py_ssize_t count, longest, piece
    if most < MIN_PIECE:
        return 0
    longest = <Py_ssize_t> most
    count = (total + longest - 1) // longest
    piece = (total + count - 1) // count
    return <int> piece if piece >= MIN_PIECE else 0


cdef enum:
    CUT_NONE = 0
    CUT_ROWS = 1
    CUT_DEPTH = 2
    CUT_ROWS_BT = 3


cdef inline int blas_cut(bint trans_a, bint trans_b, int m, int n, int k,
                         int* piece) noexcept nogil:
    """How gemm cuts a product it sends to BLAS: CUT_ROWS (the rows of C), CUT_ROWS_BT
    (the same after copying op(B) = B^T to the stack) or CUT_DEPTH (k), in pieces of
    ``piece[0]`` (the last one shorter), or CUT_NONE."""
    # Column-major terms: M = n, N = m, the first operand op(B), the second op(A).
    # D W^T through a small layer: a transposed first operand that the small kernels
    # may refuse, and that a copy of B^T turns into A B, which they always take.
    cdef bint copy_bt = trans_b and not trans_a and <double> n * k <= TRANSPOSE_MAX
    cdef int rows, depth
    piece[0] = 0
    if small_gemm_enabled():
        return CUT_NONE
    if <double> m * n * k <= BLAS_SMALL_MNK:
        if copy_bt and not _blas_small(trans_b, trans_a, n, m, k):
            piece[0] = m   # one piece: BLAS takes it small once B^T is copied
            return CUT_ROWS_BT
        return CUT_NONE
    rows = _piece(m, <double> n * k)
    if rows and _blas_small(trans_b, trans_a, n, rows, k):
        piece[0] = rows
        return CUT_ROWS
    depth = _piece(k, <double> m * n)
    if depth and _blas_small(trans_b, trans_a, n, m, depth):
        piece[0] = depth
        return CUT_DEPTH
    if copy_bt and rows:
        piece[0] = rows
        return CUT_ROWS_BT
    return CUT_NONE


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* A, int lda,
                      const floating* B, int ldb,
                      floating beta, floating* C, int ldc) noexcept nogil:
    """C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C, all row-major.

    Small products (see _small_gemm.h) with alpha 1 and beta 0 or 1 skip BLAS and its
    packing; the others go to SciPy's BLAS, cut into pieces for its small-matrix
    kernels where they qualify (see above).
    """
    cdef int piece, i, j, step
    cdef int cut
    cdef floating bt[TRANSPOSE_MAX]
    if m == 0 or n == 0:
        return
    if (alpha == 1 and (beta == 0 or beta == 1)
            and small_gemm_ok(trans_a, trans_b, m, n, k, sizeof(floating))):
        if floating is float:
            small_sgemm(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta == 1, C, ldc)
        else:
            small_dgemm(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta == 1, C, ldc)
        return
    cut = blas_cut(trans_a, trans_b, m, n, k, &piece)
    if cut == CUT_ROWS_BT:
        for i in range(n):
            for j in range(k):
                bt[j * n + i] = B[<Py_ssize_t> i * ldb + j]
        B = bt
        ldb = n
        trans_b = False
        cut = CUT_ROWS
    i = 0
    if cut == CUT_ROWS:
        while i < m:
            step = piece if m - i > piece else m - i
            _blas_gemm(trans_a, trans_b, step, n, k, alpha,
                       A + (i if trans_a else <Py_ssize_t> i * lda), lda, B, ldb,
                       beta, C + <Py_ssize_t> i * ldc, ldc)
            i += step
    elif cut == CUT_DEPTH:
        while i < k:
            step = piece if k - i > piece else k - i
            _blas_gemm(trans_a, trans_b, m, n, step, alpha,
                       A + (<Py_ssize_t> i * lda if trans_a else i), lda,
                       B + (i if trans_b else <Py_ssize_t> i * ldb), ldb,
                       beta if i == 0 else <floating> 1, C, ldc)
            i += step
    else:
        _blas_gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
