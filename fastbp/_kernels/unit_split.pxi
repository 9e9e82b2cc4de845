# Minibatch steps split by hidden units: run_epoch's 'units' mode (epoch.pxi), for a
# network with dense inputs and one or more hidden layers, the first of h units, the
# second of s_2 (the outputs, k = s_2, with one hidden layer).
#
# The first hidden layer's units are cut into `parts` consecutive ranges [u0, u1). Part c
# owns the columns u0:u1 of W_1, the units u0:u1 of b_1 and the rows u0:u1 of W_2 (one
# contiguous block of theta); with one hidden layer part 0 also owns b_2. For a minibatch
# of n rows (X_b, gathered once per thread):
#
#   forward   A_c = f(X_b W_1[:, u0:u1] + b_1[u0:u1])                (n, u1 - u0)
#             P_c = A_c W_2[u0:u1, :]  (+ b_2 for part 0, one hidden layer) (n, s_2)
#   -- barrier: every part's P_c is written --
#   upper     Z_2 = P_0 + P_1 + ... (in part order), then everything above it, the same
#             in every thread (each forms its own copy):
#             one hidden layer: Z_2 is the output; the loss and Delta_2 = dloss/dZ_2;
#             more: the layers 2..L from Z_2 (with b_2, ...), the loss, and the backward
#             pass down to Delta_2, with the gradients of W_3..W_L and b_2..b_L
#   backward  dW_2[u0:u1, :] = A_c^T Delta_2;  D_c = (Delta_2 W_2[u0:u1, :]^T) .* f'(A_c)
#             dW_1[:, u0:u1] = X_b^T D_c;       db_1[u0:u1] = colsum(D_c)
#   update    part c steps the parameters it owns (reduce_and_step, one chunk), and
#             sums the squares of its coefficients after the step; with more than one
#             hidden layer every thread also steps its own copy of W_3..W_L and b_2..b_L
#
# With more than one hidden layer, the layers above the first are replicated: each thread
# keeps a copy of W_3..W_L and b_2..b_L (and of their optimizer state) in its workspace
# for the epoch, computes the same gradient for them from the same Z_2, and takes the
# same step, so the copies stay equal bit for bit and no thread ever reads what another
# writes; thread 0 stores its copy back at the end. That work is done once per thread
# instead of once per minibatch, which the plan allows only while it is small next to
# the split layers' (see fastbp/_threads.py).
#
# One barrier per minibatch: the P_c are kept twice, by the minibatch's parity, so that a
# thread that has reached the next minibatch never overwrites what a slower one still
# reads; the squares summed after a step are the next minibatch's penalty, written
# before its barrier (the first minibatch's by units_sq). Every thread then forms the
# same loss, in the same order. They stop together on thread 0's: it publishes each
# minibatch's loss, and every thread checks it after the next barrier (a thread's copy
# of the layers above is its own, and with a BLAS whose results depended on the calling
# thread the copies, and so the losses, could drift apart: a thread that stopped on its
# own loss would leave the others waiting at the barrier).
#
# A part reads and writes only the parameters it owns, and the gradient it writes is
# complete (no per-thread copies, no reduction), so the threads exchange only the P_c
# (n x s_2 values) per minibatch. Its columns of W_1 are interleaved with the other
# parts' in theta (every row of W_1 holds a piece of each part), close enough for the
# hardware prefetchers to pull the other parts' lines into a core that then has to give
# them back on every step: each part therefore keeps its block of W_1, with its gradient
# and its Adam moments or SGD velocity, in its own workspace row, contiguous, for the
# whole epoch (units_move loads it at the start and stores it back at the end). With one
# hidden layer b_2 enters through P_0, so that no thread reads b_2 after the barrier,
# when part 0's thread may be stepping it. As with the row chunks, threads take parts
# round-robin and the result depends on `parts` only.

# Offsets in one part's row of the workspace, for a block of B rows, parts of at most p
# units (_part_width: at most the float32 width, which the workspace is sized for), s_2
# units in the second layer and s0 inputs:
#   A (B, p) | K (B, p), when the activation keeps its derivative | D (B, p) |
#   P (2, B, s_2) | upper | Xg (B, s0) | W (s0, w) | dW (s0, w) | M1 (s0, w) | M2 (s0, w)
# where w <= p is the part's width and `upper` is, with one hidden layer,
#   Z (B, k) | zeros (k, rounded up) | y (k, rounded up)
# and with more, block_pass's workspace for B rows (without its gathered rows; the
# layers from 2 up use it) and the thread's copies of theta[w_off[2]:], its gradient and
# its optimizer state (each of _upper_len, rounded up to whole lines; b_1 comes along
# in that range, unused). upper and Xg are used in the row of a thread's first part
# only; W, dW, M1 and M2 hold the part's block of W_1, its gradient and its optimizer
# state (each s0 x p long).

cdef inline Py_ssize_t _part_width(Py_ssize_t h, Py_ssize_t parts,
                                   Py_ssize_t itemsize) noexcept nogil:
    """Units per part: h / parts rounded up to whole cache lines (64 bytes) of a row of
    W_1, so that parts of a line-aligned theta whose rows are whole lines share none."""
    cdef Py_ssize_t q = 64 // itemsize
    return ((h + parts - 1) // parts + q - 1) // q * q


cdef inline Py_ssize_t _lines(Py_ssize_t n) noexcept nogil:
    """n elements rounded up to whole float32 cache lines (whole float64 ones too)."""
    return (n + 15) // 16 * 16


cdef inline Py_ssize_t _upper_len(const Spec* sp) noexcept nogil:
    """Length of theta[w_off[2]:]: W_3..W_L, then every intercept."""
    cdef Py_ssize_t total = 0
    cdef int l
    for l in range(3, sp.n_layers + 1):
        total += sp.sizes[l - 1] * sp.sizes[l]
    for l in range(1, sp.n_layers + 1):
        total += sp.sizes[l]
    return total


cdef inline Py_ssize_t _upper_work_len(const Spec* sp) noexcept nogil:
    """block_pass's workspace for sp.block rows, without the gathered rows."""
    return _lines(_xg_offset(sp))


cdef inline Py_ssize_t _units_p_off(Py_ssize_t B, Py_ssize_t p, bint keeps) noexcept nogil:
    return B * p * (3 if keeps else 2)


cdef inline Py_ssize_t _units_z_off(const Spec* sp, Py_ssize_t p) noexcept nogil:
    """Offset of `upper` (with one hidden layer, of Z) in a row."""
    return _units_p_off(sp.block, p, _keeps_z(sp, 1)) + 2 * sp.block * sp.sizes[2]


cdef inline Py_ssize_t _units_x_off(const Spec* sp, Py_ssize_t p) noexcept nogil:
    """Offset of the gathered rows Xg in a row."""
    cdef Py_ssize_t k = sp.sizes[2]
    if sp.n_layers == 2:
        return _units_z_off(sp, p) + sp.block * k + 2 * _yrow_len(k)
    return _units_z_off(sp, p) + _upper_work_len(sp) + 4 * _lines(_upper_len(sp))


cdef inline floating* _units_block(const Spec* sp, floating* row, Py_ssize_t p
                                   ) noexcept nogil:
    """The part's block of W_1 (then its gradient and state, s0 * p apart) in its row."""
    return row + _units_x_off(sp, p) + sp.block * sp.sizes[0]


cdef inline floating* _upper_copy(const Spec* sp, floating* row, Py_ssize_t p, int j
                                  ) noexcept nogil:
    """A thread's copy of theta[w_off[2]:] (j = 0), of its gradient (1) and of its
    optimizer state (2, 3), in the row of its first part (more than one hidden layer)."""
    return row + _units_z_off(sp, p) + _upper_work_len(sp) + j * _lines(_upper_len(sp))


def units_workspace_size(const Py_ssize_t[::1] sizes, const int[::1] acts,
                         Py_ssize_t block, Py_ssize_t parts):
    """Elements of one part's workspace row for run_epoch's 'units' mode: ``sizes`` of
    a network with at least one hidden layer, its activation codes in ``acts``, ``block``
    rows (the whole minibatch) and the first hidden layer's units cut into ``parts``."""
    cdef Spec sp
    if sizes.shape[0] < 3 or acts is None:
        raise ValueError("the 'units' split needs a network with a hidden layer")
    if parts < 1 or block < 0:
        raise ValueError("need parts >= 1 and block >= 0")
    # (sizes stands in for the offsets, which no size depends on)
    _fill_spec(&sp, sizes, sizes, sizes, acts, 0, block)
    cdef Py_ssize_t p = _part_width(sizes[1], parts, 4)
    return _units_x_off(&sp, p) + block * sizes[0] + 4 * sizes[0] * p


cdef void units_move(const Spec* sp, floating* theta, floating* state_1,
                     floating* state_2, floating* row, int c, int parts, bint load,
                     bint two_states) noexcept nogil:
    """Copy part c's columns of W_1 and of the optimizer state (state_2 too when
    ``two_states``: Adam) from the flat vectors into the part's row (``load``), or
    back."""
    cdef Py_ssize_t h = sp.sizes[1], s0 = sp.sizes[0], r
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating))
    cdef Py_ssize_t u0 = min(h, c * p), w = min(h, u0 + p) - u0, at
    cdef floating* block = _units_block(sp, row, p)
    cdef floating* flat[3]
    cdef floating* mine[3]
    cdef int j, n_arrays = 3 if two_states else 2
    flat[0] = theta
    flat[1] = state_1
    flat[2] = state_2
    mine[0] = block
    mine[1] = block + 2 * s0 * p
    mine[2] = block + 3 * s0 * p
    for j in range(n_arrays):
        for r in range(s0):
            at = sp.w_off[0] + r * h + u0
            if load:
                memcpy(mine[j] + r * w, flat[j] + at, w * sizeof(floating))
            else:
                memcpy(flat[j] + at, mine[j] + r * w, w * sizeof(floating))


cdef void upper_move(const Spec* sp, floating* theta, floating* state_1, floating* state_2,
                     floating* row, int parts, bint load, bint two_states) noexcept nogil:
    """Copy theta[w_off[2]:] and the optimizer state's same range (state_2 too when
    ``two_states``) into a thread's copies (``load``), or W_3..W_L and b_2..b_L back
    (b_1 belongs to the parts)."""
    cdef Py_ssize_t p = _part_width(sp.sizes[1], parts, sizeof(floating))
    cdef Py_ssize_t at = sp.w_off[2], n_w = sp.b_off[0] - at, n = _upper_len(sp)
    cdef Py_ssize_t b2 = sp.b_off[1] - at
    cdef floating* flat[3]
    cdef int j, mine
    flat[0] = theta
    flat[1] = state_1
    flat[2] = state_2
    for j in range(3 if two_states else 2):
        mine = 0 if j == 0 else j + 1   # the copies: theta, (gradient), state_1, state_2
        if load:
            memcpy(_upper_copy(sp, row, p, mine), flat[j] + at, n * sizeof(floating))
        else:
            memcpy(flat[j] + at, _upper_copy(sp, row, p, mine), n_w * sizeof(floating))
            memcpy(flat[j] + at + b2, _upper_copy(sp, row, p, mine) + b2,
                   (n - b2) * sizeof(floating))


cdef void units_forward(const Spec* sp, const floating* theta, const floating* Xg,
                        Py_ssize_t n, floating* row, int c, int parts, int par
                        ) noexcept nogil:
    """Part c's forward pass for n gathered rows Xg (n, s0): A_c, its K when kept, and
    P_c (n, s_2) into the part's workspace row (the copy of parity ``par``)."""
    cdef Py_ssize_t h = sp.sizes[1], k = sp.sizes[2], s0 = sp.sizes[0]
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating))
    cdef Py_ssize_t u0 = min(h, c * p), u1 = min(h, u0 + p), w = u1 - u0
    cdef bint keeps = _keeps_z(sp, 1)
    cdef floating* A = row
    cdef floating* P = row + _units_p_off(sp.block, p, keeps) + par * sp.block * k
    if w > 0:
        gemm(False, False, <int> n, <int> w, <int> s0, <floating> 1.0, Xg, <int> s0,
             _units_block(sp, row, p), <int> w, <floating> 0.0, A, <int> w)
        bias_activate(A, theta + sp.b_off[0] + u0, row + sp.block * p if keeps else NULL,
                      n, w, _act(sp, 1), True)
        gemm(False, False, <int> n, <int> k, <int> w, <floating> 1.0, A, <int> w,
             theta + sp.w_off[1] + u0 * k, <int> k, <floating> 0.0, P, <int> k)
    else:
        memset(P, 0, n * k * sizeof(floating))
    if c == 0 and sp.n_layers == 2:
        bias_activate(P, theta + sp.b_off[1], NULL, n, k, ACT_IDENTITY, True)


cdef double units_output(const Spec* sp, const Spec* sp_u, const floating* work,
                         Py_ssize_t ws, int parts, int par, floating* row,
                         const Py_ssize_t* rows, Py_ssize_t start, Py_ssize_t n,
                         const floating* Y, const double* sw, double scale, double* dacc,
                         floating** delta) noexcept nogil:
    """Z_2 = P_0 + ... + P_{parts-1} (in part order, their copies of parity ``par``) into
    this thread's `upper` (in ``row``, its first part's row), then everything above:
    returns the loss (sum_i w_i loss_i) and points ``delta`` at Delta_2 (n, s_2); adds
    the intercept sums of b_2..b_L to dacc (the intercepts' layout). With more than one
    hidden layer the layers 2..L run on the thread's copy of their parameters (sp_u:
    sp with offsets into that copy), and their coefficients' gradient goes to the copy's
    gradient."""
    cdef int L = sp.n_layers
    cdef Py_ssize_t h = sp.sizes[1], k = sp.sizes[2], i, c
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating)), nk = n * k
    cdef Py_ssize_t p_off = _units_p_off(sp.block, p, _keeps_z(sp, 1)) + par * sp.block * k
    cdef floating* up = row + _units_z_off(sp, p)
    cdef floating* Z = up if L == 2 else up + _act_offset(sp, 2)
    cdef floating* zeros = up + sp.block * k
    cdef floating* copy
    cdef const floating* P
    cdef double loss
    memcpy(Z, work + p_off, nk * sizeof(floating))
    for c in range(1, parts):
        P = work + c * ws + p_off
        for i in range(nk):
            Z[i] = Z[i] + P[i]
    if L == 2:
        delta[0] = Z
        return output_loss_backward(Z, zeros, Y, sp, zeros + _yrow_len(k), sw, rows, start,
                                    n, k, sp.out, scale, dacc + h)
    copy = _upper_copy(sp, row, p, 0)
    forward_layers(sp_u, copy, up, rows, start, n, 2)
    Z = up + _act_offset(sp, L)
    loss = output_loss_backward(Z, copy + sp_u.b_off[L - 1], Y, sp, up + _yrow_offset(sp),
                                sw, rows, start, n, sp.sizes[L], sp.out, scale,
                                dacc + (sp.b_off[L - 1] - sp.b_off[0]))
    delta[0] = backward_layers(sp_u, copy, _upper_copy(sp, row, p, 1), dacc, up, Z, start,
                               n, 2, False)
    return loss


cdef double units_sq(const Spec* sp, const floating* theta, floating* row, int c,
                     int parts) noexcept nogil:
    """Sum of squares of part c's coefficients (its block of W_1 in its row, then its
    rows of W_2; part 0 adds W_3..W_L's), for the first minibatch's penalty."""
    cdef Py_ssize_t h = sp.sizes[1], k = sp.sizes[2]
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating))
    cdef Py_ssize_t u0 = min(h, c * p), w = min(h, u0 + p) - u0
    cdef double sq = _sum_squares(_units_block(sp, row, p), sp.sizes[0] * w) + \
        _sum_squares(theta + sp.w_off[1] + u0 * k, w * k)
    if c == 0 and sp.n_layers > 2:
        sq += _sum_squares(theta + sp.w_off[2], sp.b_off[0] - sp.w_off[2])
    return sq


cdef void units_backward(const Spec* sp, const floating* theta, floating* grad,
                         double* dacc, const floating* Xg, const floating* Delta,
                         Py_ssize_t n, floating* row, int c, int parts) noexcept nogil:
    """Part c's gradient: dW_2[u0:u1, :] into grad (theta's layout), dW_1[:, u0:u1] into
    the part's row, and db_1[u0:u1] added to dacc (the intercepts' layout), from Delta
    (n, s_2) and the part's A_c (and K) left by units_forward."""
    cdef Py_ssize_t h = sp.sizes[1], k = sp.sizes[2], s0 = sp.sizes[0]
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating))
    cdef Py_ssize_t u0 = min(h, c * p), u1 = min(h, u0 + p), w = u1 - u0
    cdef bint keeps = _keeps_z(sp, 1)
    cdef floating* A = row
    cdef floating* D = row + sp.block * p * (2 if keeps else 1)
    if w == 0:
        return
    gemm(True, False, <int> w, <int> k, <int> n, <floating> 1.0, A, <int> w, Delta,
         <int> k, <floating> 0.0, grad + sp.w_off[1] + u0 * k, <int> k)
    gemm(False, True, <int> n, <int> w, <int> k, <floating> 1.0, Delta, <int> k,
         theta + sp.w_off[1] + u0 * k, <int> k, <floating> 0.0, D, <int> w)
    activation_backward(D, A, row + sp.block * p if keeps else NULL, n, w, _act(sp, 1),
                        True, dacc + u0)
    gemm(True, False, <int> s0, <int> w, <int> n, <floating> 1.0, Xg, <int> s0, D,
         <int> w, <floating> 0.0, _units_block(sp, row, p) + s0 * p, <int> w)
