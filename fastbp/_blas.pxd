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


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* A, int lda,
                      const floating* B, int ldb,
                      floating beta, floating* C, int ldc) noexcept nogil:
    """C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C, all row-major.

    Small products (see _small_gemm.h) with alpha 1 and beta 0 or 1 skip BLAS and its
    packing; the others go to SciPy's BLAS.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m == 0 or n == 0:
        return
    if (alpha == 1 and (beta == 0 or beta == 1)
            and small_gemm_ok(trans_a, trans_b, m, n, k, sizeof(floating))):
        if floating is float:
            small_sgemm(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta == 1, C, ldc)
        else:
            small_dgemm(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta == 1, C, ldc)
        return
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> B, &ldb, <float*> A, &lda,
              &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> B, &ldb, <double*> A, &lda,
              &beta, C, &ldc)
