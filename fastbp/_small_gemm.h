/* Small row-major GEMMs without packing.
 *
 * BLAS libraries copy ("pack") both operands into their own layout on every call. For
 * the GEMMs of a small minibatch (a few dozen rows against a layer of a few thousand
 * weights) the copies cost as much as the arithmetic. These loops compute
 *     C (m, n) = op(A) (m, k) @ op(B) (k, n) [+ C]        (all row-major)
 * directly: each output row is built in blocks of FASTBP_JB columns held in registers,
 * FASTBP_RB rows at a time, streaming the rows of B (which fit in the L1 cache, see
 * fastbp_small_gemm_ok). op(B) = B^T is first transposed into a stack buffer.
 *
 * Every element is summed in the same order, p = 0 .. k-1, starting from zero, then added
 * to C when accumulating: the blocking only changes which elements are computed together,
 * so every instruction-set variant (the block sizes differ) gives bitwise the same
 * result, and so does any split of the rows across calls.
 */
#ifndef FASTBP_SMALL_GEMM_H
#define FASTBP_SMALL_GEMM_H

#include <stddef.h>

/* Which GEMMs take this path: at most 2^18 multiply-adds (a microsecond or two of
   arithmetic, next to which packing and call overheads are large), with B (or its
   transpose) within 32 KiB, the smallest L1 data cache of the CPUs fastbp runs on. The
   limits depend on the shapes only: the same shapes take the same path everywhere. */
#define FASTBP_SMALL_B_BYTES 32768
#define FASTBP_SMALL_MACS 262144
/* The loops vectorize along the columns of C; a C narrower than this (an output layer)
   is computed transposed, along its rows, when it has enough of them. */
#define FASTBP_SMALL_MIN_N 16

#if defined(__AVX512F__)
#define FASTBP_JB_BYTES 128      /* two 512-bit registers per row block */
#elif defined(__AVX__)
#define FASTBP_JB_BYTES 64       /* two 256-bit registers */
#else
#define FASTBP_JB_BYTES 32       /* two 128-bit registers */
#endif
#define FASTBP_RB 4

/* Whether products that qualify take these loops (1) or go to BLAS all the same (0). Set
   once, when fastbp is imported (fastbp._threads.small_products), from the BLAS that
   SciPy loaded: some BLAS kernels compute small products without packing, faster than
   these loops. One flag per kernel module; only the chosen variant's module is loaded. */
static int fastbp_small_gemm_on = 1;

static inline void fastbp_set_small_gemm(int on) { fastbp_small_gemm_on = on != 0; }

static inline int fastbp_small_gemm_enabled(void) { return fastbp_small_gemm_on; }

static inline int fastbp_small_gemm_ok(int trans_a, int trans_b, int m, int n, int k,
                                       size_t itemsize) {
    if (!fastbp_small_gemm_on) return 0;
    if (trans_a && trans_b) return 0;
    if (m <= 0 || n <= 0 || k <= 0) return 0;
    if ((double) m * (double) n * (double) k > FASTBP_SMALL_MACS) return 0;
    if (n >= FASTBP_SMALL_MIN_N)  /* along the columns of C; op(B) streamed from L1 */
        return (size_t) k * (size_t) n * itemsize <= FASTBP_SMALL_B_BYTES;
    /* Narrow C (an output layer): C^T = op(B)^T op(A)^T, along the rows of C, with op(A)^T
       streamed from L1 and C^T built in a buffer of the same size limit. */
    return m >= FASTBP_SMALL_MIN_N
           && (size_t) k * (size_t) m * itemsize <= FASTBP_SMALL_B_BYTES
           && (size_t) n * (size_t) m * itemsize <= FASTBP_SMALL_B_BYTES;
}

#if defined(__GNUC__)
/* GCC and Clang: explicit vectors of one register each (vector extensions; each lane is
   plain IEEE arithmetic, contraction off), so the accumulators of FASTBP_RB rows x 2
   vectors stay in registers whatever the auto-vectorizer would have chosen. */
#define FASTBP_VEC_BYTES (FASTBP_JB_BYTES / 2)
/* acc[r][0..1] += a(i + r, p) * Bp[p, j0 .. j0 + 2 VL) over p, for r < ROWS. */
#define FASTBP_TWO_VECTORS(T, NAME, ROWS)                                                    \
    for (p = 0; p < k; p++) {                                                                \
        const T* b = Bp + (size_t) p * ldbp + j0;                                            \
        const V b0 = NAME##_load(b), b1 = NAME##_load(b + VL);                              \
        for (r = 0; r < (ROWS); r++) {                                                       \
            const T a = A[(size_t) (i + r) * sa_i + (size_t) p * sa_p];                      \
            acc[r][0] = acc[r][0] + a * b0;                                                  \
            acc[r][1] = acc[r][1] + a * b1;                                                  \
        }                                                                                    \
    }
#define FASTBP_DEFINE_SMALL_GEMM(T, NAME)                                                    \
typedef T NAME##_v __attribute__((vector_size(FASTBP_VEC_BYTES)));                          \
static inline NAME##_v NAME##_load(const T* p) {                                             \
    NAME##_v v; __builtin_memcpy(&v, p, sizeof v); return v; }                               \
static inline void NAME##_store(T* p, NAME##_v v) { __builtin_memcpy(p, &v, sizeof v); }   \
/* C (m, n) (+)= a (m, k) @ Bp (k, n): a(i, p) = A[i * sa_i + p * sa_p], Bp row-major. */    \
static void NAME##_core(int m, int n, int k, const T* A, size_t sa_i, size_t sa_p,          \
                        const T* Bp, int ldbp, int accumulate, T* C, int ldc) {             \
    typedef NAME##_v V;                                                                      \
    enum { VL = FASTBP_VEC_BYTES / sizeof(T), RB = FASTBP_RB };                             \
    int i, p, r, j0 = 0;                                                                     \
    /* Two vectors of columns at a time, then one. */                                        \
    for (; j0 + 2 * VL <= n; j0 += 2 * VL) {                                                 \
        for (i = 0; i < m; i += RB) {                                                        \
            const int rows = m - i < RB ? m - i : RB;                                        \
            V acc[RB][2];                                                                    \
            for (r = 0; r < RB; r++) { acc[r][0] = (V){0}; acc[r][1] = (V){0}; }             \
            /* A constant row count lets the compiler keep acc in registers. */               \
            if (rows == RB) { FASTBP_TWO_VECTORS(T, NAME, RB) }                               \
            else { FASTBP_TWO_VECTORS(T, NAME, rows) }                                        \
            for (r = 0; r < rows; r++) {                                                     \
                T* c = C + (size_t) (i + r) * ldc + j0;                                      \
                if (accumulate) {                                                            \
                    NAME##_store(c, NAME##_load(c) + acc[r][0]);                             \
                    NAME##_store(c + VL, NAME##_load(c + VL) + acc[r][1]);                   \
                } else {                                                                     \
                    NAME##_store(c, acc[r][0]);                                              \
                    NAME##_store(c + VL, acc[r][1]);                                         \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (; j0 + VL <= n; j0 += VL) {                                                         \
        for (i = 0; i < m; i += RB) {                                                        \
            const int rows = m - i < RB ? m - i : RB;                                        \
            V acc[RB];                                                                       \
            for (r = 0; r < RB; r++) acc[r] = (V){0};                                        \
            for (p = 0; p < k; p++) {                                                        \
                const V b0 = NAME##_load(Bp + (size_t) p * ldbp + j0);                       \
                for (r = 0; r < rows; r++)                                                   \
                    acc[r] = acc[r] + A[(size_t) (i + r) * sa_i + (size_t) p * sa_p] * b0;   \
            }                                                                                \
            for (r = 0; r < rows; r++) {                                                     \
                T* c = C + (size_t) (i + r) * ldc + j0;                                      \
                NAME##_store(c, accumulate ? NAME##_load(c) + acc[r] : acc[r]);              \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    /* The last columns (fewer than one vector): one at a time. */                           \
    for (; j0 < n; j0++) {                                                                   \
        for (i = 0; i < m; i++) {                                                            \
            T s = 0;                                                                         \
            for (p = 0; p < k; p++)                                                          \
                s = s + A[(size_t) i * sa_i + (size_t) p * sa_p] * Bp[(size_t) p * ldbp + j0]; \
            T* c = C + (size_t) i * ldc + j0;                                                \
            *c = accumulate ? *c + s : s;                                                    \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
/* Narrow C: C^T (n, m) = op(B)^T (n, k) @ op(A)^T (k, m), into ct, then added or copied  \
   into C. op(A)^T is A itself when A is stored transposed, else A^T in at. (Its own      \
   function: only narrow products need the two buffers on the stack.) */                   \
__attribute__((noinline))                                                                    \
static void NAME##_narrow(int trans_a, int trans_b, int m, int n, int k, const T* A,       \
                          int lda, const T* B, int ldb, int accumulate, T* C, int ldc) {   \
    T at[FASTBP_SMALL_B_BYTES / sizeof(T)];                                                  \
    T ct[FASTBP_SMALL_B_BYTES / sizeof(T)];                                                  \
    const T* At = A;                                                                         \
    int ldat = lda, i, j, p;                                                                 \
    if (!trans_a) {                                                                          \
        for (p = 0; p < k; p++)                                                              \
            for (i = 0; i < m; i++) at[(size_t) p * m + i] = A[(size_t) i * lda + p];        \
        At = at;                                                                             \
        ldat = m;                                                                            \
    }                                                                                        \
    NAME##_core(n, m, k, B, trans_b ? (size_t) ldb : 1, trans_b ? 1 : (size_t) ldb,         \
                At, ldat, 0, ct, m);                                                         \
    for (i = 0; i < m; i++) {                                                                \
        T* c = C + (size_t) i * ldc;                                                         \
        if (accumulate) { for (j = 0; j < n; j++) c[j] = c[j] + ct[(size_t) j * m + i]; }   \
        else { for (j = 0; j < n; j++) c[j] = ct[(size_t) j * m + i]; }                     \
    }                                                                                        \
}                                                                                            \
static void NAME(int trans_a, int trans_b, int m, int n, int k, const T* A, int lda,        \
                 const T* B, int ldb, int accumulate, T* C, int ldc) {                       \
    T bt[FASTBP_SMALL_B_BYTES / sizeof(T)];                                                  \
    const T* Bp = B;                                                                         \
    int ldbp = ldb, j, p;                                                                    \
    if (n < FASTBP_SMALL_MIN_N) {                                                            \
        NAME##_narrow(trans_a, trans_b, m, n, k, A, lda, B, ldb, accumulate, C, ldc);       \
        return;                                                                              \
    }                                                                                        \
    if (trans_b) {  /* B is (n, k): its transpose (k, n) into bt */                          \
        for (p = 0; p < k; p++)                                                              \
            for (j = 0; j < n; j++) bt[(size_t) p * n + j] = B[(size_t) j * ldb + p];        \
        Bp = bt;                                                                             \
        ldbp = n;                                                                            \
    }                                                                                        \
    NAME##_core(m, n, k, A, trans_a ? 1 : (size_t) lda, trans_a ? (size_t) lda : 1,         \
                Bp, ldbp, accumulate, C, ldc);                                               \
}
#else
/* Columns [j0, j0 + W) of C, for every row; W is a compile-time constant in each use, so
   the loops over j vectorize and the accumulators stay in registers. */
#define FASTBP_COLUMNS(T, W)                                                                 \
    for (i = 0; i + RB <= m; i += RB) {                                                      \
        T acc[RB][W];                                                                        \
        for (r = 0; r < RB; r++)                                                             \
            for (j = 0; j < W; j++) acc[r][j] = 0;                                           \
        for (p = 0; p < k; p++) {                                                            \
            const T* b = Bp + (size_t) p * ldbp + j0;                                        \
            for (r = 0; r < RB; r++) {                                                       \
                const T a = A[(size_t) (i + r) * sa_i + (size_t) p * sa_p];                  \
                for (j = 0; j < W; j++) acc[r][j] = acc[r][j] + a * b[j];                    \
            }                                                                                \
        }                                                                                    \
        for (r = 0; r < RB; r++) {                                                           \
            T* c = C + (size_t) (i + r) * ldc + j0;                                          \
            if (accumulate) { for (j = 0; j < W; j++) c[j] = c[j] + acc[r][j]; }             \
            else { for (j = 0; j < W; j++) c[j] = acc[r][j]; }                               \
        }                                                                                    \
    }                                                                                        \
    for (; i < m; i++) {                                                                     \
        T acc1[W];                                                                           \
        for (j = 0; j < W; j++) acc1[j] = 0;                                                 \
        for (p = 0; p < k; p++) {                                                            \
            const T* b = Bp + (size_t) p * ldbp + j0;                                        \
            const T a = A[(size_t) i * sa_i + (size_t) p * sa_p];                            \
            for (j = 0; j < W; j++) acc1[j] = acc1[j] + a * b[j];                            \
        }                                                                                    \
        T* c = C + (size_t) i * ldc + j0;                                                    \
        if (accumulate) { for (j = 0; j < W; j++) c[j] = c[j] + acc1[j]; }                   \
        else { for (j = 0; j < W; j++) c[j] = acc1[j]; }                                     \
    }

#define FASTBP_DEFINE_SMALL_GEMM(T, NAME)                                                    \
static void NAME(int trans_a, int trans_b, int m, int n, int k, const T* A, int lda,        \
                 const T* B, int ldb, int accumulate, T* C, int ldc) {                       \
    enum { JB = FASTBP_JB_BYTES / sizeof(T), RB = FASTBP_RB };                              \
    T bt[FASTBP_SMALL_B_BYTES / sizeof(T)];                                                  \
    const T* Bp = B;                                                                         \
    int ldbp = ldb;                                                                          \
    int i, j, p, r, j0 = 0;                                                                  \
    if (trans_b) {  /* B is (n, k): transpose it into bt (k, n) */                           \
        for (p = 0; p < k; p++)                                                              \
            for (j = 0; j < n; j++)                                                          \
                bt[(size_t) p * n + j] = B[(size_t) j * ldb + p];                            \
        Bp = bt;                                                                             \
        ldbp = n;                                                                            \
    }                                                                                        \
    /* a(i, p): A[i, p], or A[p, i] when A is stored transposed */                           \
    const size_t sa_i = trans_a ? 1 : (size_t) lda, sa_p = trans_a ? (size_t) lda : 1;       \
    for (; j0 + JB <= n; j0 += JB) { FASTBP_COLUMNS(T, JB) }                                 \
    /* The last columns in blocks of 16, 8, 4, 2 and 1 (or fewer than JB, whichever). */    \
    if (JB > 16 && j0 + 16 <= n) { FASTBP_COLUMNS(T, 16) j0 += 16; }                         \
    if (JB > 8 && j0 + 8 <= n) { FASTBP_COLUMNS(T, 8) j0 += 8; }                             \
    if (JB > 4 && j0 + 4 <= n) { FASTBP_COLUMNS(T, 4) j0 += 4; }                             \
    if (j0 + 2 <= n) { FASTBP_COLUMNS(T, 2) j0 += 2; }                                       \
    if (j0 + 1 <= n) { FASTBP_COLUMNS(T, 1) j0 += 1; }                                       \
}

#endif

FASTBP_DEFINE_SMALL_GEMM(float, fastbp_small_sgemm)
FASTBP_DEFINE_SMALL_GEMM(double, fastbp_small_dgemm)

#endif
