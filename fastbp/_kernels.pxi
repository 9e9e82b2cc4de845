# Backpropagation kernels for dense multilayer perceptrons.
#
# This file is compiled once per instruction-set variant (``_kernels_baseline.pyx``,
# ``_kernels_avx2.pyx``, ``_kernels_avx512.pyx`` include it); ``_core.pyx`` picks the
# variant the running CPU supports at import. Every variant is built without floating-point
# contraction, so all of them compute bitwise the same results: only their speed differs.
#
# Design
# ------
# A network with L weight layers has sizes s_0 (features) .. s_L (outputs). All of its
# parameters live in one flat vector ``theta`` in scikit-learn's packing order: W_1 .. W_L
# (each (s_{l-1}, s_l), row-major), then b_1 .. b_L. ``w_off[l]`` and ``b_off[l]`` give
# where layer l+1's coefficients and intercepts start. The gradient has the same layout.
#
# Rows are processed in blocks of at most ``block`` rows. For one block of n rows:
#
#   forward    Z_l = A_{l-1} W_l + 1 b_l^T,  A_l = f(Z_l)          (gemm, then one fused pass)
#   output     A_L = g(Z_L), loss_i, Delta_L = (A_L - Y) * w_i * scale   (one fused pass)
#   backward   dW_l (+)= A_{l-1}^T Delta_l                          (gemm, beta 0 or 1)
#              Delta_{l-1} = (Delta_l W_l^T) .* f'(A_{l-1})         (gemm, then one fused pass)
#              db_l += colsum(Delta_l)                             (float64, in the fused pass)
#
# f' is computed from the activations (logistic a(1-a), tanh 1-a^2, relu a>0), so
# pre-activations are never stored. Deltas overwrite the output buffer, then ping-pong
# between two scratch buffers. Inputs can be a dense C- or F-ordered matrix (an F-ordered
# one is used through gemm's transpose flag) or CSR arrays, for which the first layer
# multiplies the sparse rows directly. A row-index array lets a minibatch address rows
# without copying Y or the weights; dense minibatch rows are gathered into a workspace.
#
# Everything below ``cdef`` is ``noexcept nogil`` and allocates nothing: Python allocates
# the workspaces (see ``workspace_size``), validates every argument, releases the GIL once
# per call and turns status codes into exceptions.
from cython cimport floating
from libc.math cimport exp, expf, log, log1p, logf, sqrt, sqrtf, tanh, tanhf, fabs
from libc.math cimport isfinite, NAN
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset, memcpy

from cython.parallel cimport parallel, prange, threadid
import numpy as np

from ._blas cimport gemm, small_gemm_ok

cdef extern from *:
    """
    /* OpenMP is optional at build time: without it every parallel region runs on one
       thread, and these stand-ins answer for the runtime. */
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBP_OPENMP _OPENMP
    #else
    #define FASTBP_OPENMP 0
    static int omp_get_num_threads(void) { return 1; }
    static int omp_get_max_threads(void) { return 1; }
    #endif
    #if defined(_MSC_VER)
    #define FASTBP_INLINE __inline
    #else
    #define FASTBP_INLINE inline
    #endif
    /* The widest vector ISA the compiler was allowed to use for this variant. */
    #if defined(__AVX512F__)
    #define FASTBP_ISA "avx512"
    #elif defined(__AVX2__)
    #define FASTBP_ISA "avx2"
    #else
    #define FASTBP_ISA "baseline"
    #endif

    /* A team barrier whose waiters spin only while spinning pays. Each thread carries a
       spin budget (in pause instructions): a wait that ends within it doubles the budget
       (up to FASTBP_SPIN_MAX), a wait that outlasts it halves it and yields the CPU until
       the barrier opens. On a busy machine (more runnable threads than cores) the thread
       a waiter waits for is off the CPU, waits outlast any budget, and budgets fall to
       zero within a few minibatches: waiters then only yield, which lets that thread run.
       The caller starts the budgets at zero when it already sees such a machine. */
    #define FASTBP_SPIN_MAX 4096
    static FASTBP_INLINE void fastbp_spin_done(int* budget, int spins, int yielded) {
        if (yielded) {
            *budget /= 2;
        } else if (*budget < FASTBP_SPIN_MAX && spins * 2 > *budget) {
            *budget = *budget * 2 + 16 > FASTBP_SPIN_MAX ? FASTBP_SPIN_MAX
                                                          : *budget * 2 + 16;
        }
    }
    #if defined(_MSC_VER)
    #include <windows.h>
    #include <intrin.h>
    typedef struct { volatile long count; volatile long generation; } fastbp_barrier_t;
    static FASTBP_INLINE void fastbp_barrier_wait(fastbp_barrier_t* b, int team,
                                                  int* budget) {
        long gen = InterlockedCompareExchange(&b->generation, 0, 0);
        if (InterlockedIncrement(&b->count) == team) {
            InterlockedExchange(&b->count, 0);
            InterlockedExchange(&b->generation, gen + 1);
            return;
        }
        int spins = 0, yielded = 0;
        while (InterlockedCompareExchange(&b->generation, 0, 0) == gen) {
            if (spins < *budget) {
                ++spins;
                YieldProcessor();
            } else {
                yielded = 1;
                SwitchToThread();
            }
        }
        fastbp_spin_done(budget, spins, yielded);
    }
    #else
    #include <sched.h>
    typedef struct { int count; int generation; } fastbp_barrier_t;
    static FASTBP_INLINE void fastbp_barrier_wait(fastbp_barrier_t* b, int team,
                                                  int* budget) {
        int gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
        if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == team) {
            __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
            return;
        }
        int spins = 0, yielded = 0;
        while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen) {
            if (spins < *budget) {
                ++spins;
    #if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
    #elif defined(__aarch64__)
                __asm__ __volatile__("yield");
    #endif
            } else {
                yielded = 1;
                sched_yield();
            }
        }
        fastbp_spin_done(budget, spins, yielded);
    }
    #endif

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
    int omp_get_num_threads() noexcept nogil
    int omp_get_max_threads() noexcept nogil
    int OPENMP_VERSION "FASTBP_OPENMP"
    const char* COMPILED_ISA "FASTBP_ISA"
    ctypedef struct barrier_t "fastbp_barrier_t":
        long count
        long generation
    void barrier_wait "fastbp_barrier_wait"(barrier_t* b, int team, int* budget) noexcept nogil
    int SPIN_MAX "FASTBP_SPIN_MAX"
    bint fx_add "fastbp_fx_add"(int64_t* w, double v) noexcept nogil
    void fx_merge "fastbp_fx_merge"(int64_t* d, const int64_t* s) noexcept nogil
    double fx_value "fastbp_fx_value"(const int64_t* w) noexcept nogil


# Hidden activations. Codes are part of the kernel ABI; the Python layer maps names.
cdef enum:
    ACT_IDENTITY = 0
    ACT_LOGISTIC = 1
    ACT_TANH = 2
    ACT_RELU = 3

# Output layers, each with its canonical loss.
cdef enum:
    OUT_IDENTITY = 0   # squared error
    OUT_LOGISTIC = 1   # binary log-loss per column
    OUT_SOFTMAX = 2    # multinomial log-loss
    OUT_EXP = 3        # half Poisson deviance

ACTIVATIONS = {"identity": ACT_IDENTITY, "logistic": ACT_LOGISTIC, "tanh": ACT_TANH,
               "relu": ACT_RELU}
OUTPUTS = {"identity": OUT_IDENTITY, "logistic": OUT_LOGISTIC, "softmax": OUT_SOFTMAX,
           "exp": OUT_EXP}

# Solvers understood by run_epoch.
cdef enum:
    SOLVER_SGD_ = 0
    SOLVER_ADAM_ = 1

SOLVERS = {"sgd": SOLVER_SGD_, "adam": SOLVER_ADAM_}


cdef struct Spec:
    # The network: sizes has n_layers + 1 entries; offsets index the flat vector.
    int n_layers
    const Py_ssize_t* sizes
    const Py_ssize_t* w_off
    const Py_ssize_t* b_off
    int act
    int out
    Py_ssize_t block        # rows per block: the workspace is sized for it
    Py_ssize_t max_hidden   # widest hidden layer (1 when there is none)


cdef struct Input:
    # Dense: X with element (i, j) at X[i * ldx + j] (C order) or X[j * ldx + i] (F order).
    # Sparse (CSR): data/indices/indptr, and X is NULL.
    const void* X
    Py_ssize_t ldx
    bint x_fortran
    const void* data
    const int* indices
    const Py_ssize_t* indptr


# ---------------------------------------------------------------------------------------
# Scalar helpers: single-precision math for float, double for double.

cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline uint64_t _splitmix64(uint64_t* state) noexcept nogil:
    cdef uint64_t z
    state[0] += <uint64_t> 0x9E3779B97F4A7C15
    z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t> 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t> 0x94D049BB133111EB
    return z ^ (z >> 31)


cdef void _shuffle(Py_ssize_t* idx, Py_ssize_t n, uint64_t seed) noexcept nogil:
    """Fisher-Yates shuffle of idx (n,) in place."""
    cdef Py_ssize_t i, j, tmp
    cdef uint64_t state = seed
    for i in range(n - 1, 0, -1):
        j = <Py_ssize_t> (_splitmix64(&state) % <uint64_t> (i + 1))
        tmp = idx[i]
        idx[i] = idx[j]
        idx[j] = tmp


# ---------------------------------------------------------------------------------------
# Layer kernels. Shapes: n rows in the block, m units in the layer.

cdef void bias_activate(floating* Z, const floating* b, Py_ssize_t n, Py_ssize_t m,
                        int act) noexcept nogil:
    """Z (n, m) <- f(Z + b) in place, for a hidden activation f."""
    cdef Py_ssize_t i, j
    cdef floating* z
    cdef floating v
    for i in range(n):
        z = Z + i * m
        if act == ACT_RELU:
            for j in range(m):
                v = z[j] + b[j]
                z[j] = v if v > 0 else 0
        elif act == ACT_TANH:
            for j in range(m):
                z[j] = _tanh(z[j] + b[j])
        elif act == ACT_LOGISTIC:
            for j in range(m):
                z[j] = 1 / (1 + _exp(-(z[j] + b[j])))
        else:
            for j in range(m):
                z[j] = z[j] + b[j]


cdef void activation_backward(floating* D, const floating* A, Py_ssize_t n, Py_ssize_t m,
                              int act, double* db) noexcept nogil:
    """D (n, m) <- D .* f'(A) in place, with f' written in terms of A = f(Z).

    Adds the column sums of the result to db (m,), in float64.
    """
    cdef Py_ssize_t i, j
    cdef floating* d
    cdef const floating* a
    for i in range(n):
        d = D + i * m
        a = A + i * m
        # Branch-free selects (a data-dependent branch per element mispredicts half the
        # time for relu); the float64 column sums run in their own loop so that both
        # loops vectorize.
        if act == ACT_RELU:
            for j in range(m):
                d[j] = d[j] if a[j] > 0 else 0
        elif act == ACT_TANH:
            for j in range(m):
                d[j] = d[j] * (1 - a[j] * a[j])
        elif act == ACT_LOGISTIC:
            for j in range(m):
                d[j] = d[j] * a[j] * (1 - a[j])
        for j in range(m):
            db[j] += d[j]


cdef void output_activate(floating* Z, const floating* b, Py_ssize_t n, Py_ssize_t m,
                          int out) noexcept nogil:
    """Z (n, m) <- g(Z + b) in place, for an output activation g (no loss)."""
    cdef Py_ssize_t i, j
    cdef floating* z
    cdef floating mx, s
    for i in range(n):
        z = Z + i * m
        for j in range(m):
            z[j] = z[j] + b[j]
        if out == OUT_SOFTMAX:
            mx = z[0]
            for j in range(1, m):
                if z[j] > mx:
                    mx = z[j]
            s = 0
            for j in range(m):
                z[j] = _exp(z[j] - mx)
                s = s + z[j]
            for j in range(m):
                z[j] = z[j] / s
        elif out == OUT_LOGISTIC:
            for j in range(m):
                z[j] = 1 / (1 + _exp(-z[j]))
        elif out == OUT_EXP:
            for j in range(m):
                z[j] = _exp(z[j])


cdef double output_loss_backward(floating* Z, const floating* b, const floating* Y,
                                 const double* sw, const Py_ssize_t* rows, Py_ssize_t start,
                                 Py_ssize_t n, Py_ssize_t m, int out, double scale,
                                 double* db) noexcept nogil:
    """Output layer with its canonical loss, for one block.

    Z (n, m): pre-activations without the bias on entry, Delta_L on exit, where
    Delta_L[i] = dloss_i/dz_i * w_i * scale (= (g(z_i) - y_i) w_i scale for a proper target). Y (n_total, m) and sw (n_total,) are indexed
    by rows[start + i] (or start + i when rows is NULL). Adds colsum(Delta_L) to db (m,).
    Returns sum_i w_i * loss_i in float64. The losses are computed from z, exactly:
      softmax   logsumexp(z) * sum(y) - y.z
      logistic  sum_j softplus(z_j) - y_j z_j
      identity  0.5 * ||z - y||^2
      exp       sum_j exp(z_j) - y_j z_j - y_j + y_j log y_j
    """
    cdef Py_ssize_t i, j, r
    cdef floating* z
    cdef const floating* y
    cdef floating p, mx, c
    cdef double w, li, s, yz, ysum, lse, zj, total = 0.0
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        y = Y + r * m
        w = sw[r] if sw != NULL else 1.0
        c = <floating> (w * scale)
        z = Z + i * m
        for j in range(m):
            z[j] = z[j] + b[j]
        li = 0.0
        if out == OUT_SOFTMAX:
            mx = z[0]
            for j in range(1, m):
                if z[j] > mx:
                    mx = z[j]
            s = 0.0
            yz = 0.0
            ysum = 0.0
            for j in range(m):
                yz += <double> y[j] * z[j]
                ysum += y[j]
                z[j] = _exp(z[j] - mx)
                s += z[j]
            lse = mx + log(s)
            li = ysum * lse - yz
            for j in range(m):
                # d/dz of sum(y) lse(z) - y.z: exact also when a row of Y is not one-hot.
                p = <floating> (ysum * z[j] / s)
                z[j] = (p - y[j]) * c
                db[j] += z[j]
        elif out == OUT_LOGISTIC:
            for j in range(m):
                zj = z[j]
                li += (zj if zj > 0 else 0.0) + log1p(exp(-fabs(zj))) - y[j] * zj
                p = 1 / (1 + _exp(-z[j]))
                z[j] = (p - y[j]) * c
                db[j] += z[j]
        elif out == OUT_EXP:
            for j in range(m):
                zj = z[j]
                p = _exp(z[j])
                li += <double> p - y[j] * zj - y[j]
                if y[j] > 0:
                    li += y[j] * log(<double> y[j])
                z[j] = (p - y[j]) * c
                db[j] += z[j]
        else:
            for j in range(m):
                p = z[j] - y[j]
                li += 0.5 * (<double> p) * p
                z[j] = p * c
                db[j] += z[j]
        total += w * li
    return total


cdef void sparse_forward(const floating* data, const int* indices, const Py_ssize_t* indptr,
                         const Py_ssize_t* rows, Py_ssize_t start, Py_ssize_t n,
                         const floating* W, floating* Z, Py_ssize_t fan_out) noexcept nogil:
    """Z (n, fan_out) = X[rows] W for CSR X, without densifying X. Overwrites Z."""
    cdef Py_ssize_t i, j, p, r
    cdef floating v
    cdef floating* z
    cdef const floating* w
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        z = Z + i * fan_out
        for j in range(fan_out):
            z[j] = 0
        for p in range(indptr[r], indptr[r + 1]):
            v = data[p]
            w = W + <Py_ssize_t> indices[p] * fan_out
            for j in range(fan_out):
                z[j] = z[j] + v * w[j]


cdef void sparse_backward(const floating* data, const int* indices, const Py_ssize_t* indptr,
                          const Py_ssize_t* rows, Py_ssize_t start, Py_ssize_t n,
                          const floating* D, floating* dW, Py_ssize_t fan_in,
                          Py_ssize_t fan_out, bint accumulate) noexcept nogil:
    """dW (fan_in, fan_out) (+)= X[rows]^T D for CSR X; overwrites dW unless accumulate."""
    cdef Py_ssize_t i, j, p, r
    cdef floating v
    cdef floating* g
    cdef const floating* d
    if not accumulate:
        memset(dW, 0, fan_in * fan_out * sizeof(floating))
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        d = D + i * fan_out
        for p in range(indptr[r], indptr[r + 1]):
            v = data[p]
            g = dW + <Py_ssize_t> indices[p] * fan_out
            for j in range(fan_out):
                g[j] = g[j] + v * d[j]


# ---------------------------------------------------------------------------------------
# Workspace layout for a block of B rows:
#   A_1 (B, s_1) | ... | A_L (B, s_L) | D0 (B, h) | D1 (B, h) | Xg (B, s_0)
# with h the widest hidden layer. A_L holds the output, then Delta_L.

cdef inline Py_ssize_t _act_offset(const Spec* sp, int l) noexcept nogil:
    """Offset of A_l (l >= 1) in the workspace."""
    cdef Py_ssize_t off = 0
    cdef int k
    for k in range(1, l):
        off += sp.block * sp.sizes[k]
    return off


cdef inline Py_ssize_t _scratch_offset(const Spec* sp) noexcept nogil:
    return _act_offset(sp, sp.n_layers + 1)


def workspace_size(const Py_ssize_t[::1] sizes, Py_ssize_t block, bint gather=True):
    """Number of elements in the workspace for ``sizes`` and ``block`` rows.

    ``gather=False`` leaves out the buffer that dense minibatch rows are gathered into
    (not needed for sparse input, nor for full-batch passes over dense rows in place).
    """
    cdef Py_ssize_t total = 0, hidden = 1
    cdef Py_ssize_t l, L = sizes.shape[0] - 1
    for l in range(1, L + 1):
        total += sizes[l]
        if l < L and sizes[l] > hidden:
            hidden = sizes[l]
    return block * (total + 2 * hidden + (sizes[0] if gather else 0))


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


# ---------------------------------------------------------------------------------------
# One block: forward, and optionally loss + backward.

cdef double block_pass(const Spec* sp, const Input* inp, const Py_ssize_t* rows,
                       Py_ssize_t start, Py_ssize_t n, const floating* Y, const double* sw,
                       double scale, const floating* theta, floating* grad, double* dacc,
                       floating* work, bint accumulate, floating* out_rows) noexcept nogil:
    """Run rows [start, start + n) (through ``rows`` when not NULL) through the network.

    With Y NULL: forward only; the output activations are copied to out_rows (n, s_L).
    Otherwise returns sum_i w_i * loss_i, and, when grad is not NULL, adds this block's
    gradient to grad (dW, gemm beta = 1 when ``accumulate``, else overwriting) and to dacc
    (the intercept gradients in float64, laid out like theta's intercept part).
    """
    cdef int L = sp.n_layers, l
    cdef const Py_ssize_t* s = sp.sizes
    cdef Py_ssize_t i, j, s0 = s[0], lda0
    cdef bint trans0 = False
    cdef bint is_sparse = inp.X == NULL
    cdef const floating* X = <const floating*> inp.X
    cdef const floating* A0 = NULL
    cdef const floating* Aprev
    cdef floating* Z
    cdef floating* D
    cdef floating* Dnext
    cdef floating* scratch = work + _scratch_offset(sp)
    cdef floating* Xg = scratch + 2 * sp.block * sp.max_hidden
    cdef double loss
    cdef Py_ssize_t r
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
            for i in range(n):
                r = rows[start + i]
                if inp.x_fortran:
                    for j in range(s0):
                        Xg[i * s0 + j] = X[j * inp.ldx + r]
                else:
                    memcpy(Xg + i * s0, X + r * inp.ldx, s0 * sizeof(floating))
            A0 = Xg
            lda0 = s0

    # Forward.
    for l in range(1, L + 1):
        Z = work + _act_offset(sp, l)
        if l == 1:
            _input_product(sp, inp, rows, start, n, A0, trans0, lda0,
                           theta + sp.w_off[0], Z)
        else:
            gemm(False, False, <int> n, <int> s[l], <int> s[l - 1], <floating> 1.0,
                 work + _act_offset(sp, l - 1), <int> s[l - 1], theta + sp.w_off[l - 1],
                 <int> s[l], <floating> 0.0, Z, <int> s[l])
        if l < L:
            bias_activate(Z, theta + sp.b_off[l - 1], n, s[l], sp.act)

    Z = work + _act_offset(sp, L)
    if Y == NULL:
        output_activate(Z, theta + sp.b_off[L - 1], n, s[L], sp.out)
        memcpy(out_rows, Z, n * s[L] * sizeof(floating))
        return 0.0

    loss = output_loss_backward(Z, theta + sp.b_off[L - 1], Y, sw, rows, start, n, s[L],
                                sp.out, scale, dacc + (sp.b_off[L - 1] - sp.b_off[0]))
    if grad == NULL:
        return loss

    # Backward: D holds Delta_l.
    D = Z
    for l in range(L, 0, -1):
        if l == 1:
            if is_sparse:
                sparse_backward(<const floating*> inp.data, inp.indices, inp.indptr, rows,
                                start, n, D, grad + sp.w_off[0], s0, s[1], accumulate)
            else:
                # dW_1 = A_0^T D; an F-ordered A_0 is already A_0^T in row-major terms.
                gemm(not trans0, False, <int> s0, <int> s[1], <int> n, <floating> 1.0,
                     A0, <int> lda0, D, <int> s[1], beta, grad + sp.w_off[0], <int> s[1])
            break
        Aprev = work + _act_offset(sp, l - 1)
        gemm(True, False, <int> s[l - 1], <int> s[l], <int> n, <floating> 1.0,
             Aprev, <int> s[l - 1], D, <int> s[l], beta, grad + sp.w_off[l - 1],
             <int> s[l])
        Dnext = scratch + (l % 2) * sp.block * sp.max_hidden
        gemm(False, True, <int> n, <int> s[l - 1], <int> s[l], <floating> 1.0,
             D, <int> s[l], theta + sp.w_off[l - 1], <int> s[l], <floating> 0.0,
             Dnext, <int> s[l - 1])
        activation_backward(Dnext, Aprev, n, s[l - 1], sp.act,
                            dacc + (sp.b_off[l - 2] - sp.b_off[0]))
        D = Dnext
    return loss


cdef double _sum_squares(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum(x^2) in float64, with eight independent partial sums (one serial chain of
    additions would be latency-bound)."""
    cdef Py_ssize_t i, k, n8 = n - n % 8
    cdef double acc[8]
    cdef double sq = 0.0
    for k in range(8):
        acc[k] = 0.0
    for i in range(0, n8, 8):
        for k in range(8):
            acc[k] += (<double> x[i + k]) * x[i + k]
    for i in range(n8, n):
        sq += (<double> x[i]) * x[i]
    for k in range(8):
        sq += acc[k]
    return sq


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


# ---------------------------------------------------------------------------------------
# Delta-rule updates over the flat vector (scikit-learn's formulas).

cdef void sgd_step(floating* theta, const floating* grad, floating* velocity, Py_ssize_t n,
                   double lr, double momentum, bint nesterov) noexcept nogil:
    """velocity = momentum * velocity - lr * grad; theta += velocity, or with Nesterov
    theta += momentum * velocity - lr * grad."""
    cdef Py_ssize_t i
    cdef floating v, g, mu = <floating> momentum, eta = <floating> lr
    for i in range(n):
        g = grad[i]
        v = mu * velocity[i] - eta * g
        velocity[i] = v
        if nesterov:
            theta[i] = theta[i] + (mu * v - eta * g)
        else:
            theta[i] = theta[i] + v


cdef void adam_step(floating* theta, const floating* grad, floating* m1, floating* m2,
                    Py_ssize_t n, double lr_t, double beta_1, double beta_2,
                    double epsilon) noexcept nogil:
    """m1 = b1 m1 + (1-b1) g; m2 = b2 m2 + (1-b2) g^2; theta -= lr_t m1 / (sqrt(m2) + eps),
    where lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t) is computed by the caller."""
    cdef Py_ssize_t i
    cdef floating g, b1 = <floating> beta_1, b2 = <floating> beta_2
    cdef floating c1 = <floating> (1 - beta_1), c2 = <floating> (1 - beta_2)
    cdef floating eta = <floating> lr_t, eps = <floating> epsilon
    for i in range(n):
        g = grad[i]
        m1[i] = b1 * m1[i] + c1 * g
        m2[i] = b2 * m2[i] + c2 * g * g
        theta[i] = theta[i] - eta * m1[i] / (_sqrt(m2[i]) + eps)


# ---------------------------------------------------------------------------------------
# Python entry points: typed memoryviews in, status out; the GIL is released once.

cdef void _fill_spec(Spec* sp, const Py_ssize_t[::1] sizes, const Py_ssize_t[::1] w_off,
                     const Py_ssize_t[::1] b_off, int act, int out, Py_ssize_t block):
    cdef Py_ssize_t l
    sp.n_layers = <int> (sizes.shape[0] - 1)
    sp.sizes = &sizes[0]
    sp.w_off = &w_off[0]
    sp.b_off = &b_off[0]
    sp.act = act
    sp.out = out
    sp.block = block
    sp.max_hidden = 1
    for l in range(1, sp.n_layers):
        if sizes[l] > sp.max_hidden:
            sp.max_hidden = sizes[l]


cdef int _fill(Spec* sp, Input* inp, const Py_ssize_t[::1] sizes,
               const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act, int out,
               Py_ssize_t block, const floating[:, :] X, const floating[::1] data,
               const int[::1] indices, const Py_ssize_t[::1] indptr,
               const floating[::1] theta) except -1:
    cdef Py_ssize_t itemsize = sizeof(floating)
    _fill_spec(sp, sizes, w_off, b_off, act, out, block)
    inp.X = NULL
    inp.data = NULL
    inp.indices = NULL
    inp.indptr = NULL
    inp.ldx = 0
    inp.x_fortran = False
    if X is not None:
        if X.shape[0] > 0 and X.shape[1] > 0:
            inp.X = &X[0, 0]
            if X.strides[1] == itemsize:
                inp.ldx = X.strides[0] // itemsize
            elif X.strides[0] == itemsize:
                inp.ldx = X.strides[1] // itemsize
                inp.x_fortran = True
            else:
                raise ValueError("X must be C- or F-contiguous in its inner dimension")
        else:
            inp.X = &theta[0]  # never read: no rows or no features
            inp.ldx = X.shape[1]
    else:
        inp.data = &data[0] if data.shape[0] > 0 else &theta[0]
        inp.indices = &indices[0] if indices.shape[0] > 0 else NULL
        inp.indptr = &indptr[0]
    return 0


# Full-batch passes: threads take blocks of rows in any order; each block's results (loss,
# gradient or product, intercept sums) are added exactly (fx_add) into the thread's
# fixed-point accumulator, and the accumulators are merged exactly. So the result is
# bitwise the same for any number of threads, and for any split of the rows into chunks at
# block boundaries (Dask's chunks: each returns its accumulator, merged on the driver).
# An accumulator holds n_params + 2 entries of FXW words: the parameters, then the loss,
# then a count of values that could not be added (non-finite or beyond 2^116).

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
              const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act, int out,
              floating[:, ::1] work, floating[:, ::1] tgrad, double[:, ::1] tdacc,
              int64_t[:, ::1] acc, Py_ssize_t block, double scale, double alpha,
              int n_threads, bint finish=True):
    """Full-batch objective over all rows, streamed in blocks; returns the loss (float).

    grad (n_params,) is overwritten, or left alone when None. scale = 1 / sum(weights).
    X is dense (and data/indices/indptr None) or None (and they hold CSR arrays).
    work, tgrad (n_params), tdacc (n_intercepts) and acc (accumulator_size) have one row
    per thread. The exact sums end in acc[0]; with ``finish`` False they are left there
    (for merging with other chunks' sums, then ``finish_loss_grad``) and 0 is returned.
    BLAS must be single-threaded while n_threads > 1 (the caller sees to it).
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = Y.shape[0], n_params = theta.shape[0]
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
    _fill(&sp, &inp, sizes, w_off, b_off, act, out, block, X, data, indices, indptr, theta)
    if grad is not None:
        g = &grad[0]
    if sample_weight is not None:
        sw = &sample_weight[0]
    if n > 0:
        Y_p = &Y[0, 0]
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
    _fill_spec(&sp, sizes, w_off, b_off, 0, 0, 1)
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
    _fill_spec(&sp, sizes, w_off, b_off, 0, 0, 1)
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
            const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act, int out,
            floating[:, ::1] work, Py_ssize_t block, int n_threads):
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
    _fill(&sp, &inp, sizes, w_off, b_off, act, out, block, X, data, indices, indptr, theta)
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


cdef enum:
    STEP_CHUNK = 1024   # parameters per chunk in reduce_and_step (4-8 KiB per array)


cdef double reduce_and_step(const Spec* sp, floating* theta, floating* grads,
                            const double* daccs, int chunks, Py_ssize_t lo, Py_ssize_t hi,
                            double scale, double alpha, int solver, double lr,
                            double momentum, bint nesterov, double beta_1, double beta_2,
                            double epsilon, floating* state_1, floating* state_2
                            ) noexcept nogil:
    """Sum the chunks' gradients for parameters [lo, hi), add the L2 term, and step.

    grads is (chunks, n_params) and daccs (chunks, n_intercepts), one row per chunk; the
    reduced gradient is written to grads[0, lo:hi], summed in chunk order. lr is the step
    size (Adam's bias-corrected lr_t). Returns sum(theta[i]^2) over the coefficients in
    [lo, hi), taken before the step, for the penalty term of the loss.
    """
    cdef Py_ssize_t i, k, n_params = sp.b_off[sp.n_layers - 1] + sp.sizes[sp.n_layers]
    cdef Py_ssize_t n_coef = sp.b_off[0], n_int = n_params - n_coef
    cdef Py_ssize_t c_hi = min(hi, n_coef), c0, c1
    cdef floating a = <floating> (alpha * scale)
    cdef double acc, sq = 0.0
    # The intercepts' gradients, from the float64 sums.
    for i in range(max(lo, n_coef), hi):
        acc = daccs[i - n_coef]
        for k in range(1, chunks):
            acc += daccs[k * n_int + i - n_coef]
        grads[i] = <floating> acc
    # Chunk by chunk, so that every pass over a chunk finds it in L1; within a chunk each
    # loop runs over i innermost and vectorizes.
    c0 = lo
    while c0 < hi:
        c1 = min(hi, c0 + STEP_CHUNK)
        if c0 < c_hi:
            for k in range(1, chunks):
                for i in range(c0, min(c1, c_hi)):
                    grads[i] = grads[i] + grads[k * n_params + i]
            if alpha != 0.0:
                sq += _sum_squares(theta + c0, min(c1, c_hi) - c0)
                for i in range(c0, min(c1, c_hi)):
                    grads[i] = grads[i] + a * theta[i]
        if solver == SOLVER_ADAM_:
            adam_step(theta + c0, grads + c0, state_1 + c0, state_2 + c0, c1 - c0, lr,
                      beta_1, beta_2, epsilon)
        else:
            sgd_step(theta + c0, grads + c0, state_1 + c0, c1 - c0, lr, momentum, nesterov)
        c0 = c1
    return sq


def run_epoch(floating[::1] theta, floating[:, ::1] grads, const floating[:, :] X,
              const floating[::1] data, const int[::1] indices,
              const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
              const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
              const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act, int out,
              floating[:, ::1] work, double[:, ::1] dacc, Py_ssize_t[::1] order,
              bint shuffle, unsigned long long seed, Py_ssize_t batch_size, double alpha,
              int solver, double learning_rate, double momentum, bint nesterov,
              double beta_1, double beta_2, double epsilon, floating[::1] state_1,
              floating[::1] state_2, long long[::1] step, int n_chunks, int n_threads=0,
              bint spin=True):
    """One epoch of minibatch SGD or Adam, entirely without the GIL.

    ``order`` (n_samples,) holds the row order and is shuffled in place first when
    ``shuffle``. Each minibatch of ``batch_size`` rows (the last may be shorter) gets the
    gradient of its own objective (weighted mean loss + L2 over its weight sum), then one
    update: SGD with ``state_1`` as velocity, or Adam with moments ``state_1``/``state_2``
    and ``step[0]`` as its step counter.

    Every minibatch is cut into ``n_chunks`` chunks of consecutive rows, each with its own
    gradient row in ``grads`` and ``dacc`` (shape (n_chunks, ...)); the chunk gradients
    are then summed in chunk order, and the parameter vector, cut into n_chunks slices,
    is stepped. ``n_threads`` threads (default n_chunks; at most n_chunks) share the
    chunks and the slices round-robin, each with its own row of ``work``. So the result
    depends on n_chunks only, never on how many threads ran: the caller may run fewer
    threads on a busy machine and get the same model. Two barriers per minibatch; BLAS
    must be single-threaded meanwhile (the caller sees to it). ``work`` rows are sized for
    ceil(batch_size / n_chunks) rows. With ``spin`` false (the caller sees more runnable
    threads than cores) barrier waiters start without a spin budget: they yield the CPU
    at once (see fastbp_barrier_wait).

    Returns (sum over batches of batch loss x batch rows, number of batches run); the
    epoch stops at the first non-finite batch loss, which the caller detects from the sum.
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = order.shape[0], n_params = theta.shape[0]
    cdef int C = n_chunks
    cdef Py_ssize_t per_chunk = (batch_size + C - 1) // C if C > 0 else 0
    cdef Py_ssize_t n_int = dacc.shape[1], ws = work.shape[1]
    cdef Py_ssize_t p_per = (n_params + C - 1) // C if C > 0 else 0
    cdef const double* sw = NULL
    cdef floating* theta_p = &theta[0]
    cdef floating* grads_p = &grads[0, 0]
    cdef floating* work_p = &work[0, 0]
    cdef double* dacc_p = &dacc[0, 0]
    cdef Py_ssize_t* order_p = &order[0]
    cdef const floating* Y_p
    cdef floating* s1 = &state_1[0]
    cdef floating* s2 = &state_2[0]
    cdef long long t0 = step[0]
    cdef double[::1] parts = np.zeros(4 * max(C, 1))   # [parity][loss | sq][chunk]
    cdef double* parts_p = &parts[0]
    cdef double[::1] result = np.zeros(3)
    cdef double* result_p = &result[0]
    cdef barrier_t bar
    cdef barrier_t* bar_p = &bar
    # Thread-private (assigned inside the parallel block):
    cdef int tid, team, k, par, budget, c
    cdef Py_ssize_t start, nb, lo, hi, i, rows_per
    cdef double total, wsum, scale, loss, sq, lr_t, n_batches
    cdef long long t

    if n_threads <= 0:
        n_threads = n_chunks
    if n_chunks < 1 or n_threads > n_chunks:
        raise ValueError("need 1 <= n_threads <= n_chunks")
    if grads.shape[0] < n_chunks or dacc.shape[0] < n_chunks or work.shape[0] < n_threads:
        raise ValueError("grads and dacc need one row per chunk, work one per thread")
    if grads.shape[1] != n_params or state_1.shape[0] != n_params:
        raise ValueError("grads and state_1 must match theta's length")
    if solver == SOLVER_ADAM_ and state_2.shape[0] != n_params:
        raise ValueError("state_2 must match theta's length for Adam")
    _fill(&sp, &inp, sizes, w_off, b_off, act, out, per_chunk, X, data, indices, indptr,
          theta)
    if sample_weight is not None:
        sw = &sample_weight[0]
    if n == 0:
        return 0.0, 0
    Y_p = &Y[0, 0]
    if shuffle:
        with nogil:
            _shuffle(order_p, n, seed)
    bar.count = 0
    bar.generation = 0
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        team = omp_get_num_threads()   # OpenMP may give fewer threads than asked
        budget = SPIN_MAX if spin else 0
        total = 0.0
        n_batches = 0
        t = t0
        par = 0
        start = 0
        while start < n:
            nb = min(batch_size, n - start)
            if sw != NULL:
                wsum = 0.0
                for i in range(start, start + nb):
                    wsum = wsum + sw[order_p[i]]
            else:
                wsum = nb
            scale = 1.0 / wsum if wsum > 0 else 0.0
            # Phase 1: this thread's chunks of the batch, each into its own buffers.
            rows_per = (nb + C - 1) // C
            c = tid
            while c < C:
                lo = min(nb, c * rows_per)
                hi = min(nb, lo + rows_per)
                memset(dacc_p + c * n_int, 0, n_int * sizeof(double))
                loss = 0.0
                if hi > lo:
                    loss = block_pass(&sp, &inp, order_p, start + lo, hi - lo, Y_p, sw,
                                      scale, theta_p, grads_p + c * n_params,
                                      dacc_p + c * n_int, work_p + tid * ws, False, NULL)
                else:
                    memset(grads_p + c * n_params, 0, b_off[0] * sizeof(floating))
                parts_p[par * 2 * C + c] = loss
                c = c + team
            barrier_wait(bar_p, team, &budget)
            # Phase 2: this thread's slices of the parameters: reduce, then step.
            if solver == SOLVER_ADAM_:
                t = t + 1
                lr_t = learning_rate * sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
            else:
                lr_t = learning_rate
            c = tid
            while c < C:
                lo = min(n_params, c * p_per)
                hi = min(n_params, lo + p_per)
                sq = reduce_and_step(&sp, theta_p, grads_p, dacc_p, C, lo, hi, scale,
                                     alpha, solver, lr_t, momentum, nesterov, beta_1,
                                     beta_2, epsilon, s1, s2)
                parts_p[par * 2 * C + C + c] = sq
                c = c + team
            barrier_wait(bar_p, team, &budget)
            # Every thread forms the same batch loss from the parts, in chunk order.
            loss = 0.0
            sq = 0.0
            for k in range(C):
                loss = loss + parts_p[par * 2 * C + k]
                sq = sq + parts_p[par * 2 * C + C + k]
            loss = loss * scale + 0.5 * alpha * scale * sq
            total = total + loss * nb
            n_batches = n_batches + 1
            if not isfinite(loss):
                break
            start = start + nb
            par = 1 - par
        if tid == 0:
            result_p[0] = total
            result_p[1] = n_batches
            result_p[2] = <double> t
    step[0] = <long long> result[2]
    return result[0], int(result[1])


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
    _fill_spec(&sp, sizes, w_off, w_off, 0, 0, block)
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            _block_gemms(&sp, X_p, start, min(block, n - start), theta_p,
                         tg + tid * n_params, work_p + tid * ws, False)


def sgd_update(floating[::1] theta, const floating[::1] grad, floating[::1] velocity,
               double learning_rate, double momentum, bint nesterov):
    """One SGD/momentum/Nesterov step over the flat vector, in place."""
    if not (theta.shape[0] == grad.shape[0] == velocity.shape[0]):
        raise ValueError("theta, grad and velocity must have the same length")
    with nogil:
        sgd_step(&theta[0], &grad[0], &velocity[0], theta.shape[0], learning_rate,
                 momentum, nesterov)


def adam_update(floating[::1] theta, const floating[::1] grad, floating[::1] m1,
                floating[::1] m2, long long t, double learning_rate, double beta_1,
                double beta_2, double epsilon):
    """One Adam step (t is the step number, from 1) over the flat vector, in place."""
    cdef double lr_t
    if not (theta.shape[0] == grad.shape[0] == m1.shape[0] == m2.shape[0]):
        raise ValueError("theta, grad, m1 and m2 must have the same length")
    if t < 1:
        raise ValueError(f"t counts Adam steps from 1, got {t}")
    lr_t = learning_rate * sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    with nogil:
        adam_step(&theta[0], &grad[0], &m1[0], &m2[0], theta.shape[0], lr_t, beta_1,
                  beta_2, epsilon)


# ---------------------------------------------------------------------------------------
# Curvature products (R-operator), for one block.
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
#
# Per-thread workspace for B rows: RA_1..RA_L | RZ_1..RZ_{L-1} | 4 scratch (B, w), with w
# the widest non-input layer (the output deltas live in scratch too). The forward
# activations A_1..A_L of every block live in a cache, so that repeated products at the
# same theta (Newton-CG, CG inside Hessian-free) skip the forward pass.


def acts_size(const Py_ssize_t[::1] sizes, Py_ssize_t n_samples, Py_ssize_t block):
    """Elements of the forward-activation cache for n_samples rows in blocks."""
    cdef Py_ssize_t total = 0, l
    cdef Py_ssize_t n_blocks = (n_samples + block - 1) // block
    for l in range(1, sizes.shape[0]):
        total += sizes[l]
    return n_blocks * block * total

def rop_workspace_size(const Py_ssize_t[::1] sizes, Py_ssize_t block):
    """Elements of one thread's workspace for curvature products over ``block`` rows
    (the forward activations live in a separate per-block cache: ``acts_size``)."""
    cdef Py_ssize_t total = 0, widest = 1
    cdef Py_ssize_t l, L = sizes.shape[0] - 1
    for l in range(1, L + 1):
        total += sizes[l]
        if l < L:
            total += sizes[l]
        if sizes[l] > widest:
            widest = sizes[l]
    return block * (total + 4 * widest)


cdef inline Py_ssize_t _rop_ra(const Spec* sp, int l) noexcept nogil:
    return _act_offset(sp, l)


cdef inline Py_ssize_t _rop_rz(const Spec* sp, int l) noexcept nogil:
    return _act_offset(sp, sp.n_layers + 1) + _act_offset(sp, l)


cdef inline Py_ssize_t _rop_scratch(const Spec* sp) noexcept nogil:
    return _act_offset(sp, sp.n_layers + 1) + _act_offset(sp, sp.n_layers)


cdef void _add_bias(floating* Z, const floating* c, Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(n):
        for j in range(m):
            Z[i * m + j] = Z[i * m + j] + c[j]


cdef void _act_deriv_mul(floating* R, const floating* A, Py_ssize_t n, Py_ssize_t m,
                         int act) noexcept nogil:
    """R <- R .* f'(A), with f' written in terms of A = f(Z)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t nm = n * m
    if act == ACT_RELU:
        for i in range(nm):
            R[i] = R[i] if A[i] > 0 else 0
    elif act == ACT_TANH:
        for i in range(nm):
            R[i] = R[i] * (1 - A[i] * A[i])
    elif act == ACT_LOGISTIC:
        for i in range(nm):
            R[i] = R[i] * A[i] * (1 - A[i])


cdef void activation_rbackward(floating* RD, floating* D, const floating* A,
                               const floating* RZ, Py_ssize_t n, Py_ssize_t m, int act,
                               double* db) noexcept nogil:
    """RD <- RD .* f'(A) + D .* f''(A) .* RZ and D <- D .* f'(A); db += colsum(RD).

    On entry RD = RD_l W_l^T + D_l V_l^T and D = D_l W_l^T (both (n, m))."""
    cdef Py_ssize_t i, j
    cdef floating a, d1, d2
    for i in range(n):
        for j in range(m):
            a = A[i * m + j]
            if act == ACT_TANH:
                d1 = 1 - a * a
                d2 = -2 * a * d1
            elif act == ACT_LOGISTIC:
                d1 = a * (1 - a)
                d2 = d1 * (1 - 2 * a)
            elif act == ACT_RELU:
                d1 = 1 if a > 0 else 0
                d2 = 0
            else:
                d1 = 1
                d2 = 0
            RD[i * m + j] = RD[i * m + j] * d1 + D[i * m + j] * d2 * RZ[i * m + j]
            D[i * m + j] = D[i * m + j] * d1
            db[j] += RD[i * m + j]


cdef void output_curvature(floating* R, const floating* P, floating* D, const floating* Y,
                           const double* sw, const Py_ssize_t* rows, Py_ssize_t start,
                           Py_ssize_t n, Py_ssize_t m, int out, double scale,
                           double* db) noexcept nogil:
    """R (n, m) <- H_out(R) * w_i * scale per row, with P the output activations; adds
    colsum to db. When D is not NULL, also D <- dloss/dz * w_i * scale (the deltas)."""
    cdef Py_ssize_t i, j, r
    cdef const floating* y
    cdef floating* rr
    cdef const floating* p
    cdef floating c, ysum, pr
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        y = Y + r * m
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
                rr[j] = p[j] * (1 - p[j]) * rr[j] * c
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
    dacc (float64, laid out like theta's intercepts) the intercept part. acts holds this
    block's A_1..A_L: computed here unless ``have_forward`` (same theta as before).
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
                bias_activate(Z, theta + sp.b_off[l - 1], n, s[l], sp.act)
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
            _act_deriv_mul(RZ, acts + _act_offset(sp, l), n, s[l], sp.act)

    # Output curvature: RD_L (in RA_L's place) and, for the Hessian, D_L.
    RD = work + _rop_ra(sp, L)
    D = scr if exact else NULL
    output_curvature(RD, acts + _act_offset(sp, L), D, Y, sw, NULL, start, n, s[L],
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
                                 work + _rop_rz(sp, l - 1), n, s[l - 1], sp.act, db)
            D = Dn
        else:
            activation_backward(RDn, acts + _act_offset(sp, l - 1), n, s[l - 1], sp.act, db)
        RD = RDn


def curvature_product(const floating[::1] theta, const floating[::1] v,
                      floating[::1] out_arr, const floating[:, :] X,
                      const floating[::1] data, const int[::1] indices,
                      const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
                      const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
                      const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act,
                      int out, floating[:, ::1] work, floating[:, ::1] tgrad,
                      double[:, ::1] tdacc, int64_t[:, ::1] acc, floating[::1] acts,
                      bint have_forward, Py_ssize_t block, double scale, double alpha,
                      bint exact, int n_threads, bint finish=True):
    """Gauss-Newton (or exact Hessian) times v over all rows, into out_arr (n_params,).

    Blocks, threads, buffers and exact sums as in ``loss_grad`` (bitwise the same for any
    n_threads; ``finish`` False leaves the sums in acc[0], see ``finish_product``). work
    is (n_threads, rop_workspace_size(sizes, block)); acts (acts_size(...)) caches the
    forward activations: pass ``have_forward`` when it holds them for this theta.
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = Y.shape[0], n_params = theta.shape[0], i
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
    cdef floating* acts_p = &acts[0]
    cdef Py_ssize_t per_block = 0
    cdef int tid
    cdef Py_ssize_t b, start
    cdef bint ok
    for i in range(1, sizes.shape[0]):
        per_block += block * sizes[i]
    if acts.shape[0] < n_blocks * per_block:
        raise ValueError("the activation cache is too small")
    if v.shape[0] != n_params or out_arr.shape[0] != n_params:
        raise ValueError("direction or output does not match theta")
    _check_exact_buffers(n_params, n_params - n_coef, n_threads, work, tgrad, tdacc, acc)
    _fill(&sp, &inp, sizes, w_off, b_off, act, out, block, X, data, indices, indptr, theta)
    if sample_weight is not None:
        sw = &sample_weight[0]
    if n > 0:
        Y_p = &Y[0, 0]
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        memset(acc_p + tid * asz, 0, asz * sizeof(int64_t))
        for b in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = b * block
            memset(td + tid * n_int, 0, n_int * sizeof(double))
            block_rop(&sp, &inp, start, min(block, n - start), Y_p, sw, scale, theta_p,
                      v_p, tg + tid * n_params, td + tid * n_int, work_p + tid * ws,
                      acts_p + b * per_block, have_forward, False, exact)
            ok = _fx_block(acc_p + tid * asz, tg + tid * n_params, n_coef, 0)
            ok = _fx_block64(acc_p + tid * asz, td + tid * n_int, n_int, n_coef) and ok
            if not ok:
                acc_p[tid * asz + FXW * (n_params + 1)] += 1
    with nogil:
        _fx_merge_threads(acc_p, n_threads, asz)
        if finish:
            # The L2 term and the intercept parts, exactly as for a gradient (v for W).
            _finish(&sp, acc_p, v_p, o, td, n_params, scale, alpha, False)


# ---------------------------------------------------------------------------------------
# Diagonal of the empirical Fisher: sum_i s w_i (grad of loss_i)^2, for Hessian-free's
# preconditioner. For one layer the per-sample gradient of W is the outer product
# a_i (x) delta_i, so its square is a_i^2 (x) delta_i^2 and the sum over a block is one
# GEMM, (A .* A)^T (D .* D), with the row factor c_i folded into the first operand.

def fisher_workspace_size(const Py_ssize_t[::1] sizes, Py_ssize_t block):
    """Elements of one thread's workspace for ``fisher_diag`` over ``block`` rows."""
    cdef Py_ssize_t widest = 1, l
    for l in range(sizes.shape[0]):
        if sizes[l] > widest:
            widest = sizes[l]
    return workspace_size(sizes, block, False) + 2 * block * widest


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
            activation_backward(Dnext, work + _act_offset(sp, l - 1), n, k, sp.act,
                                sink + (sp.b_off[l - 2] - sp.b_off[0]))
            D = Dnext


cdef inline double _row_factor(const double* sw, Py_ssize_t r, double scale) noexcept nogil:
    """1 / (scale * w_r), or 0 for a zero weight (whose row contributes nothing)."""
    cdef double w = sw[r] if sw != NULL else 1.0
    return 1.0 / (scale * w) if w > 0 else 0.0


def fisher_diag(const floating[::1] theta, floating[::1] out_arr, const floating[:, :] X,
                const floating[::1] data, const int[::1] indices,
                const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
                const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
                const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off, int act, int out,
                floating[:, ::1] work, floating[:, ::1] tgrad, double[:, ::1] tdacc,
                int64_t[:, ::1] acc, Py_ssize_t block, double scale, int n_threads,
                bint finish=True):
    """Diagonal of the empirical Fisher, sum_i scale * w_i * (grad loss_i)^2, into out_arr.

    No L2 term. Blocks, threads, buffers and exact sums as in ``loss_grad`` (``finish``
    False leaves the sums in acc[0], see ``finish_sums``); work is
    (n_threads, fisher_workspace_size(sizes, block)).
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = Y.shape[0], n_params = theta.shape[0]
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
    if out_arr.shape[0] != n_params or ws < fisher_workspace_size(sizes, block):
        raise ValueError("output or workspace does not match")
    _check_exact_buffers(n_params, n_int, n_threads, work, tgrad, tdacc, acc)
    _fill(&sp, &inp, sizes, w_off, b_off, act, out, block, X, data, indices, indptr, theta)
    if sample_weight is not None:
        sw = &sample_weight[0]
    if n > 0:
        Y_p = &Y[0, 0]
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
# What this variant is: for fastbp.show_config() and the thread-count defaults.

def build_info():
    """The widest vector ISA this variant was compiled for, and its OpenMP version (0:
    built without OpenMP)."""
    return {"isa": COMPILED_ISA.decode(), "openmp": OPENMP_VERSION}


def openmp_max_threads():
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl's limits."""
    return omp_get_max_threads()


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
