# Common ground of the kernel files: cimports, the OpenMP stand-ins, the activation and
# output codes, the two structs every kernel takes, and small shared helpers.
#
#   Spec   the network: n_layers, sizes s_0..s_L, where W_l and b_l start in the flat
#          vector (w_off, b_off), one activation code per hidden layer (acts; _act(sp, l)
#          reads hidden layer l's), the output code, the rows per block (workspaces are
#          sized for it) and the widest hidden layer.
#   Input  the rows: a dense matrix (C or F order, leading dimension ldx) or CSR arrays.
#
# ACTIVATIONS and OUTPUTS map names to the codes for fastbp/_network.py. The math helpers
# (_exp, _expm1, _log1p, _tanh, _sqrt in their argument's precision: for float,
# the branch-free versions of fastbp/_vmath.h, which the compiler inlines and vectorizes
# and which round alike in every variant; for double, the C library's; _sum_squares, a
# float64 sum of squares in one fixed order) are noexcept nogil. _fill_spec and _fill hold the GIL: they
# turn a def entry point's typed memoryviews into a Spec and an Input, and raise on a
# layout the kernels cannot read. The C here is shared: the OpenMP stand-ins serve
# epoch.pxi and tools.pxi, FASTBP_INLINE the C of exact_sums.pxi and epoch.pxi.

from cython cimport floating
from libc.math cimport exp, log, log1p, logf, sqrt, sqrtf, tanh, fabs
from libc.math cimport expm1, erfc
from libc.math cimport isfinite, NAN, cos, M_PI
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memset, memcpy

from cython.parallel cimport parallel, prange, threadid
import numpy as np

from ._blas cimport (gemm, small_gemm_ok, set_small_gemm, small_gemm_enabled, blas_cut,
                     CUT_ROWS, CUT_DEPTH, CUT_ROWS_BT)

cdef extern from "_vmath.h" nogil:
    float fbp_expf(float x)
    double fbp_exp(double x)
    float fbp_expm1f(float x)
    float fbp_log1pf(float x)
    float fbp_tanhf(float x)
    float fbp_ncdff(float z, float* pdf)
    float fbp_softplusf(float v, float* deriv)
    float fbp_sigmoidf(float v)


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
    """
    int omp_get_num_threads() noexcept nogil
    int omp_get_max_threads() noexcept nogil
    int OPENMP_VERSION "FASTBP_OPENMP"


# Hidden activations. Codes are part of the kernel ABI; the Python layer maps names.
# GELU and SiLU are the two whose derivatives cannot be written from f(z): their layers
# keep Z as well (see _keeps_z and the workspace layout in block_pass.pxi).
cdef enum:
    ACT_IDENTITY = 0
    ACT_LOGISTIC = 1
    ACT_TANH = 2
    ACT_RELU = 3
    ACT_LEAKY_RELU = 4   # z, or 0.01 z for z < 0
    ACT_ELU = 5          # z, or e^z - 1 for z <= 0 (alpha 1)
    ACT_GELU = 6         # z Phi(z), exact (with erfc)
    ACT_SILU = 7         # z sigmoid(z)
    ACT_SOFTPLUS = 8     # log(1 + e^z) = max(z, 0) + log1p(e^-|z|)
    ACT_END = 9          # one past the last code

# Output layers, each with its canonical loss.
cdef enum:
    OUT_IDENTITY = 0   # squared error
    OUT_LOGISTIC = 1   # binary log-loss per column
    OUT_SOFTMAX = 2    # multinomial log-loss
    OUT_EXP = 3        # half Poisson deviance

ACTIVATIONS = {"identity": ACT_IDENTITY, "logistic": ACT_LOGISTIC, "tanh": ACT_TANH,
               "relu": ACT_RELU, "leaky_relu": ACT_LEAKY_RELU, "elu": ACT_ELU,
               "gelu": ACT_GELU, "silu": ACT_SILU, "softplus": ACT_SOFTPLUS}
OUTPUTS = {"identity": OUT_IDENTITY, "logistic": OUT_LOGISTIC, "softmax": OUT_SOFTMAX,
           "exp": OUT_EXP}


cdef struct Spec:
    # The network: sizes has n_layers + 1 entries; offsets index the flat vector.
    int n_layers
    const Py_ssize_t* sizes
    const Py_ssize_t* w_off
    const Py_ssize_t* b_off
    const int* acts         # n_layers - 1 codes, hidden layer l's at acts[l - 1]; NULL
                            # when there is no hidden layer (or for sums only: identity)
    int out
    Py_ssize_t block        # rows per block: the workspace is sized for it
    Py_ssize_t max_hidden   # widest hidden layer (1 when there is none)
    # Extras of block_pass, off (NULL) unless an entry point sets them:
    void* deltas            # per-sample deltas: layer l's (n_total, s_l), layer by layer
    void* input_grad        # per-sample input gradients (n_total, s_0)
    Py_ssize_t n_total      # rows of those outputs (block rows land at their row index)
    const double* drop      # dropout rate per hidden layer (training only)
    uint64_t drop_seed      # the epoch's dropout seed
    const uint64_t* row_keys  # per-row keys of the masks (a hash of the row), or NULL
    # Sparse targets (CSR, n_total-independent: row r of the data), or NULL for dense Y:
    const void* y_data
    const int* y_indices
    const Py_ssize_t* y_indptr


cdef struct Input:
    # Dense: X with element (i, j) at X[i * ldx + j] (C order) or X[j * ldx + i] (F order).
    # Sparse (CSR): data/indices/indptr, and X is NULL.
    const void* X
    Py_ssize_t ldx
    bint x_fortran
    const void* data
    const int* indices
    const Py_ssize_t* indptr


cdef inline int _act(const Spec* sp, int l) noexcept nogil:
    """The activation code of hidden layer l (1 <= l < n_layers)."""
    return sp.acts[l - 1] if sp.acts != NULL else ACT_IDENTITY


cdef inline bint _z_code(int act) noexcept nogil:
    """Whether an activation's layers keep a second array, K: f'(z) in the gradient
    pass, z in the curvature pass. gelu and silu need it (their f' and f'' need z, not
    f(z)); softplus keeps it to save the backward pass an exp (its f' = sigmoid(z) comes
    out of the forward pass's exp)."""
    return act == ACT_GELU or act == ACT_SILU or act == ACT_SOFTPLUS


cdef inline bint _keeps_z(const Spec* sp, int l) noexcept nogil:
    """Whether layer l (1 <= l <= n_layers) is a hidden layer that keeps Z_l."""
    return 1 <= l < sp.n_layers and _z_code(_act(sp, l))


# ---------------------------------------------------------------------------------------
# Scalar helpers: single-precision math for float, double for double.

cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return fbp_expf(x)
    else:
        return fbp_exp(x)


cdef inline floating _expm1(floating x) noexcept nogil:
    if floating is float:
        return fbp_expm1f(x)
    else:
        return expm1(x)


cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return fbp_log1pf(x)
    else:
        return log1p(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return fbp_tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef double _sum_squares(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum(x^2) in float64, in one order fixed by this source whatever the vector unit:
    32 independent partial sums (on AVX-512 four vector chains, where eight sums made
    one, whose additions' latency then set the pace), folded pairwise (32 -> 16 -> ...
    -> 1, a few vector additions instead of a serial chain), then the tail past the last
    multiple of 32."""
    cdef Py_ssize_t i, k, n32 = n - n % 32
    cdef double acc[32]
    cdef double tail = 0.0
    for k in range(32):
        acc[k] = 0.0
    for i in range(0, n32, 32):
        for k in range(32):
            acc[k] += (<double> x[i + k]) * x[i + k]
    for i in range(n32, n):
        tail += (<double> x[i]) * x[i]
    return _fold32(acc, tail)


cdef inline double _fold32(double* acc, double tail) noexcept nogil:
    """_sum_squares' last step: its 32 partial sums folded pairwise, then the tail."""
    cdef int k
    for k in range(16):
        acc[k] += acc[k + 16]
    for k in range(8):
        acc[k] += acc[k + 8]
    for k in range(4):
        acc[k] += acc[k + 4]
    for k in range(2):
        acc[k] += acc[k + 2]
    return (acc[0] + acc[1]) + tail


# ---------------------------------------------------------------------------------------
# For the def entry points: typed memoryviews in, a Spec and an Input out.

cdef int _fill_spec(Spec* sp, const Py_ssize_t[::1] sizes, const Py_ssize_t[::1] w_off,
                    const Py_ssize_t[::1] b_off, const int[::1] acts, int out,
                    Py_ssize_t block) except -1:
    """acts: one activation code per hidden layer (None: identity everywhere, for the
    passes that only finish sums). Never takes the address of an empty view's first
    element: a network without hidden layers gets acts = NULL."""
    cdef Py_ssize_t l
    sp.n_layers = <int> (sizes.shape[0] - 1)
    sp.sizes = &sizes[0]
    sp.w_off = &w_off[0]
    sp.b_off = &b_off[0]
    sp.acts = NULL
    if acts is not None:
        if acts.shape[0] != sp.n_layers - 1:
            raise ValueError(f"acts needs one activation code per hidden layer "
                             f"({sp.n_layers - 1}), got {acts.shape[0]}")
        for l in range(acts.shape[0]):
            if acts[l] < 0 or acts[l] >= ACT_END:
                raise ValueError(f"activation code {acts[l]} is not one of the kernels'")
        if acts.shape[0] > 0:
            sp.acts = &acts[0]
    sp.out = out
    sp.block = block
    sp.deltas = NULL
    sp.input_grad = NULL
    sp.n_total = 0
    sp.drop = NULL
    sp.drop_seed = 0
    sp.row_keys = NULL
    sp.y_data = NULL
    sp.y_indices = NULL
    sp.y_indptr = NULL
    sp.max_hidden = 1
    for l in range(1, sp.n_layers):
        if sizes[l] > sp.max_hidden:
            sp.max_hidden = sizes[l]
    return 0


cdef inline Py_ssize_t _yrow_len(Py_ssize_t m) noexcept nogil:
    """Elements of a workspace's target row (sparse targets are scattered into it, one
    row at a time): m rounded up to a multiple of 16."""
    return (m + 15) // 16 * 16


cdef inline const floating* _target_row(const Spec* sp, const floating* Y, Py_ssize_t r,
                                        Py_ssize_t m, floating* yrow) noexcept nogil:
    """Row r of the targets: Y's (dense, m columns), or the sparse targets' row r
    scattered into yrow (m,), never the whole matrix densified."""
    cdef Py_ssize_t p
    cdef const floating* ydata
    if sp.y_indptr == NULL:
        return Y + r * m
    ydata = <const floating*> sp.y_data
    memset(yrow, 0, m * sizeof(floating))
    for p in range(sp.y_indptr[r], sp.y_indptr[r + 1]):
        yrow[sp.y_indices[p]] += ydata[p]
    return yrow


cdef Py_ssize_t _n_rows(const floating[:, ::1] Y, const Py_ssize_t[::1] y_indptr) except -1:
    """Rows of the targets: dense Y, or CSR targets (y_indptr has n + 1 entries)."""
    if Y is not None:
        return Y.shape[0]
    if y_indptr is None or y_indptr.shape[0] < 1:
        raise ValueError("targets: give Y, or y_data, y_indices and y_indptr (CSR)")
    return y_indptr.shape[0] - 1


cdef int _fill_targets(Spec* sp, const floating[:, ::1] Y, const floating[::1] y_data,
                       const int[::1] y_indices, const Py_ssize_t[::1] y_indptr,
                       const floating** Y_p) except -1:
    """Point the kernels at the targets: Y_p at dense Y's first row (NULL without rows),
    or sp's sparse-target fields at the CSR arrays (then Y_p is NULL). The CSR arrays
    are checked here too (O(n + nnz)), as every kernel argument is: indptr
    non-decreasing from 0 to nnz, every index in [0, m)."""
    cdef Py_ssize_t m = sp.sizes[sp.n_layers], n, i
    Y_p[0] = NULL
    if Y is not None:
        if y_data is not None or y_indices is not None or y_indptr is not None:
            raise ValueError("targets: give Y or the CSR arrays, not both")
        if Y.shape[1] != m:
            raise ValueError(f"Y needs one column per output ({m}), got {Y.shape[1]}")
        if Y.shape[0] > 0:
            Y_p[0] = &Y[0, 0]
        return 0
    if (y_data is None or y_indices is None or y_indptr is None
            or y_indptr.shape[0] < 1):
        raise ValueError("targets: give Y, or y_data, y_indices and y_indptr (CSR)")
    n = y_indptr.shape[0] - 1
    if (y_data.shape[0] != y_indices.shape[0] or y_indptr[0] != 0
            or y_indptr[n] != y_data.shape[0]):
        raise ValueError("sparse targets: y_data, y_indices and y_indptr do not match")
    for i in range(n):
        if y_indptr[i + 1] < y_indptr[i]:
            raise ValueError("sparse targets: y_indptr must be non-decreasing")
    for i in range(y_indices.shape[0]):
        if not 0 <= y_indices[i] < m:
            raise ValueError(f"sparse targets: column index {y_indices[i]} is outside "
                             f"[0, {m})")
    sp.y_indptr = &y_indptr[0]
    if y_data.shape[0] > 0:
        sp.y_data = &y_data[0]
        sp.y_indices = &y_indices[0]
    return 0


cdef int _fill(Spec* sp, Input* inp, const Py_ssize_t[::1] sizes,
               const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
               const int[::1] acts, int out, Py_ssize_t block, const floating[:, :] X,
               const floating[::1] data, const int[::1] indices, const Py_ssize_t[::1] indptr,
               const floating[::1] theta) except -1:
    cdef Py_ssize_t itemsize = sizeof(floating)
    _fill_spec(sp, sizes, w_off, b_off, acts, out, block)
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
