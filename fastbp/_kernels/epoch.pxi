# One epoch of minibatch SGD or Adam, entirely without the GIL: run_epoch, called by
# fastbp/_solvers.py. The row order is shuffled first (Fisher-Yates driven by splitmix64:
# the same order for a seed on every machine). Then each minibatch takes two phases,
# each ended by a team barrier:
#
#   1. its rows, cut into n_chunks chunks of consecutive rows: each chunk's gradient into
#      its own buffers (block_pass over the rows, through the row-index array);
#   2. the parameters, cut into n_chunks slices: reduce_and_step sums the chunks'
#      gradients in chunk order, adds the L2 term and steps (updates.pxi).
#
# Threads take chunks and slices round-robin, so the result depends on n_chunks only,
# never on how many threads ran. The barrier (the C below) spins within an adaptive
# budget, else yields the CPU. The cdef functions are noexcept nogil; nothing is
# allocated inside the parallel region, and every sum runs in chunk order.

cdef extern from *:
    """
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
    """
    ctypedef struct barrier_t "fastbp_barrier_t":
        long count
        long generation
    void barrier_wait "fastbp_barrier_wait"(barrier_t* b, int team, int* budget) noexcept nogil
    int SPIN_MAX "FASTBP_SPIN_MAX"


# Solvers understood by run_epoch.
cdef enum:
    SOLVER_SGD_ = 0
    SOLVER_ADAM_ = 1

SOLVERS = {"sgd": SOLVER_SGD_, "adam": SOLVER_ADAM_}


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


cdef enum:
    STEP_CHUNK = 1024   # parameters per chunk in reduce_and_step (4-8 KiB per array)


cdef double reduce_and_step(const Spec* sp, floating* theta, floating* grads,
                            const double* daccs, int chunks, Py_ssize_t lo, Py_ssize_t hi,
                            double scale, double alpha, int solver, double lr,
                            double momentum, bint nesterov, double beta_1, double beta_2,
                            double epsilon, floating* state_1, floating* state_2,
                            bint sq_after=False) noexcept nogil:
    """Sum the chunks' gradients for parameters [lo, hi), add the L2 term, and step.

    grads is (chunks, n_params) and daccs (chunks, n_intercepts), one row per chunk; the
    reduced gradient is written to grads[0, lo:hi], summed in chunk order. lr is the step
    size (Adam's bias-corrected lr_t). Returns sum(theta[i]^2) over the coefficients in
    [lo, hi), taken before the step (after it with ``sq_after``), for the penalty term
    of the loss.
    """
    cdef Py_ssize_t i, k, n_params = sp.b_off[sp.n_layers - 1] + sp.sizes[sp.n_layers]
    cdef Py_ssize_t n_coef = sp.b_off[0], n_int = n_params - n_coef
    cdef Py_ssize_t c_hi = min(hi, n_coef), c0, c1, n_l2
    cdef floating a = <floating> (alpha * scale)
    cdef double acc, sq = 0.0, chunk_sq
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
        # The coefficients get the L2 term, and their sum of squares is taken (before
        # the step, for this minibatch's loss), inside the step's own pass.
        n_l2 = min(c1, c_hi) - c0 if (c0 < c_hi and alpha != 0.0) else 0
        chunk_sq = 0.0
        if solver == SOLVER_ADAM_:
            adam_step(theta + c0, grads + c0, state_1 + c0, state_2 + c0, c1 - c0, lr,
                      beta_1, beta_2, epsilon, n_l2, a, &chunk_sq if n_l2 > 0 else NULL,
                      sq_after)
        else:
            sgd_step(theta + c0, grads + c0, state_1 + c0, c1 - c0, lr, momentum, nesterov,
                     n_l2, a, &chunk_sq if n_l2 > 0 else NULL, sq_after)
        if n_l2 > 0:
            sq += chunk_sq
        c0 = c1
    return sq


cdef double units_step(const Spec* sp, floating* theta, floating* grads, const double* dacc,
                       floating* row, int c, int parts, double scale, double alpha,
                       int solver, double lr, double momentum, bint nesterov, double beta_1,
                       double beta_2, double epsilon, floating* state_1, floating* state_2
                       ) noexcept nogil:
    """Step the parameters that part c of the 'units' split owns (unit_split.pxi) from
    its complete gradient: its block of W_1 with its gradient and state in its
    workspace ``row``; the rows u0:u1 of W_2 from grads (theta's layout); b_1[u0:u1] and,
    for part 0, b_2 from dacc (its intercept sums). Returns the sum of squares of its
    coefficients after the step: the next minibatch's penalty, known before its
    barrier."""
    cdef Py_ssize_t h = sp.sizes[1], k = sp.sizes[2], s0 = sp.sizes[0]
    cdef Py_ssize_t p = _part_width(h, parts, sizeof(floating))
    cdef Py_ssize_t u0 = min(h, c * p), u1 = min(h, u0 + p)
    cdef floating* block = _units_block(sp, row, p)
    cdef double sq
    # The block is all coefficients: as the range [0, s0 * w) of a vector, for
    # reduce_and_step, of which W_1 comes first. Then the rows of W_2, then b_1[u0:u1]
    # and b_2 (part 0), contiguous in theta.
    sq = reduce_and_step(sp, block, block + s0 * p, dacc, 1, 0, s0 * (u1 - u0), scale,
                         alpha, solver, lr, momentum, nesterov, beta_1, beta_2, epsilon,
                         block + 2 * s0 * p, block + 3 * s0 * p, True)
    sq += reduce_and_step(sp, theta, grads, dacc, 1, sp.w_off[1] + u0 * k,
                          sp.w_off[1] + u1 * k, scale, alpha, solver, lr, momentum,
                          nesterov, beta_1, beta_2, epsilon, state_1, state_2, True)
    reduce_and_step(sp, theta, grads, dacc, 1, sp.b_off[0] + u0, sp.b_off[0] + u1, scale,
                    alpha, solver, lr, momentum, nesterov, beta_1, beta_2, epsilon,
                    state_1, state_2)
    if c == 0 and sp.n_layers == 2:
        reduce_and_step(sp, theta, grads, dacc, 1, sp.b_off[1], sp.b_off[1] + k, scale,
                        alpha, solver, lr, momentum, nesterov, beta_1, beta_2, epsilon,
                        state_1, state_2)
    return sq


cdef double upper_step(const Spec* sp, const Spec* sp_u, floating* row, int parts,
                       const double* dacc, double scale, double alpha, int solver,
                       double lr, double momentum, bint nesterov, double beta_1,
                       double beta_2, double epsilon) noexcept nogil:
    """Step a thread's copy of W_3..W_L and b_2..b_L (more than one hidden layer; see
    unit_split.pxi) from the copy's gradient and the intercept sums in dacc. sp_u
    indexes the copy. Returns the sum of squares of W_3..W_L after the step."""
    cdef Py_ssize_t p = _part_width(sp.sizes[1], parts, sizeof(floating))
    cdef floating* copy = _upper_copy(sp, row, p, 0)
    cdef floating* grad = _upper_copy(sp, row, p, 1)
    cdef floating* state_1 = _upper_copy(sp, row, p, 2)
    cdef floating* state_2 = _upper_copy(sp, row, p, 3)
    cdef double sq
    sq = reduce_and_step(sp_u, copy, grad, dacc, 1, 0, sp_u.b_off[0], scale, alpha,
                         solver, lr, momentum, nesterov, beta_1, beta_2, epsilon, state_1,
                         state_2, True)
    reduce_and_step(sp_u, copy, grad, dacc, 1, sp_u.b_off[1], _upper_len(sp), scale, alpha,
                    solver, lr, momentum, nesterov, beta_1, beta_2, epsilon, state_1,
                    state_2)
    return sq


cdef inline void _note_top(const floating* a, Py_ssize_t n, double* top) noexcept nogil:
    """top <- max(top, max |a[:n]|); NaN stays once either is NaN."""
    cdef double v
    if floating is float:
        v = fastbp_max_abs_f(a, n)
    else:
        v = fastbp_max_abs_d(a, n)
    if v != v or v > top[0]:   # (v > NaN is false: a NaN top stays)
        top[0] = v


def run_epoch(floating[::1] theta, floating[:, ::1] grads, const floating[:, :] X,
              const floating[::1] data, const int[::1] indices,
              const Py_ssize_t[::1] indptr, const floating[:, ::1] Y,
              const double[::1] sample_weight, const Py_ssize_t[::1] sizes,
              const Py_ssize_t[::1] w_off, const Py_ssize_t[::1] b_off,
              const int[::1] acts, int out, floating[:, ::1] work, double[:, ::1] dacc,
              Py_ssize_t[::1] order,
              bint shuffle, unsigned long long seed, Py_ssize_t batch_size, double alpha,
              int solver, double learning_rate, double momentum, bint nesterov,
              double beta_1, double beta_2, double epsilon, floating[::1] state_1,
              floating[::1] state_2, long long[::1] step, int n_chunks, int n_threads=0,
              bint spin=True, long long cosine_steps=0, long long cosine_start=0,
              const double[::1] drop=None, unsigned long long drop_seed=0,
              const uint64_t[::1] row_keys=None,
              const floating[::1] y_data=None, const int[::1] y_indices=None,
              const Py_ssize_t[::1] y_indptr=None, bint units=False,
              double[::1] x_tops=None):
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

    With ``cosine_steps`` S > 0 the step size decays per minibatch: the minibatch that is
    step s of the schedule (s = cosine_start, cosine_start + 1, ...) uses
    ``learning_rate * (1 + cos(pi * min(s, S) / S)) / 2``, from the full rate at s = 0
    to 0 at s = S.

    ``drop`` (one rate per hidden layer, or None) turns on inverted dropout: each hidden
    unit of each sample is zeroed with its layer's rate and the others scaled by
    1 / (1 - rate), from a counter-based draw of (drop_seed, the row's key, layer, unit),
    so the masks depend on the seed only, never on chunks or threads. ``row_keys`` (one
    uint64 per row, a hash of its features) makes identical rows draw identical masks, so
    that a weight of 2 is a repeated row also with dropout; None keys rows by index. ``work`` must then
    be sized with the same ``drop``.

    Targets are ``Y`` (dense), or, with Y None, CSR arrays ``y_data``, ``y_indices``,
    ``y_indptr`` (an autoencoder's sparse X), read one row at a time.

    With ``units`` true (dense X, no dropout), every minibatch is split by the first
    hidden layer's units instead of rows: its ``n_chunks`` parts each own a range of
    those units and the parameters that go with them, and the layers above are
    replicated per thread (see unit_split.pxi). ``grads`` then needs one row, ``work``
    one row per part of ``units_workspace_size(sizes, acts, batch_size, n_chunks)``
    elements, ``dacc`` one row per part; the result again depends on n_chunks only.

    ``x_tops`` (dense X only; one float64 per chunk or part, zeros or earlier results)
    takes max |x| of the rows the epoch gathers, as they are gathered (in cache, instead
    of a pass of its own over X): slot c gets that of chunk c's rows (a units split
    notes every row in slot 0), NaN once a NaN was seen. A complete epoch over a
    permutation of X's rows so finds max |X|, the check the estimators' input validation
    leaves to the first epoch.

    Returns (sum over batches of batch loss x batch rows, number of batches run); the
    epoch stops at the first non-finite batch loss, which the caller detects from the sum.
    """
    cdef Spec sp
    cdef Input inp
    cdef Py_ssize_t n = order.shape[0], n_params = theta.shape[0], n_rows
    cdef int C = n_chunks
    cdef Py_ssize_t per_chunk = (batch_size + C - 1) // C if C > 0 else 0
    cdef Py_ssize_t n_int = dacc.shape[1], ws = work.shape[1]
    cdef Py_ssize_t p_per = (n_params + C - 1) // C if C > 0 else 0
    cdef Py_ssize_t z_at = 0, x_at = 0, width
    cdef Spec sp_u   # units split, more than one hidden layer: offsets into a copy
    cdef Py_ssize_t[::1] w_off_u, b_off_u
    cdef bint deep = False
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
    cdef double* tops_p = NULL
    cdef barrier_t bar
    cdef barrier_t* bar_p = &bar
    # Thread-private (assigned inside the parallel block):
    cdef int tid, team, k, par, budget, c
    cdef floating* own
    cdef floating* delta
    cdef Py_ssize_t start, nb, lo, hi, i, rows_per
    cdef double total, wsum, scale, loss, sq, lr_t, lr_b, n_batches, sq_up
    cdef long long t, s_cos

    if n_threads <= 0:
        n_threads = n_chunks
    if cosine_steps < 0 or cosine_start < 0:
        raise ValueError("cosine_steps and cosine_start must be non-negative")
    if n_chunks < 1 or n_threads > n_chunks:
        raise ValueError("need 1 <= n_threads <= n_chunks")
    if units:
        if sizes.shape[0] < 3 or X is None or (drop is not None and max(drop) > 0):
            raise ValueError("the 'units' split needs a hidden layer, dense X and no "
                             "dropout")
        if dacc.shape[0] < n_chunks or work.shape[0] < n_chunks or grads.shape[0] < 1:
            raise ValueError("the 'units' split needs one work and dacc row per part")
        if ws < units_workspace_size(sizes, acts, batch_size, n_chunks):
            raise ValueError("the workspace is too small for the 'units' split")
        if dacc.shape[1] < n_params - b_off[0]:
            raise ValueError("dacc needs at least one column per intercept")
        per_chunk = batch_size
    elif (grads.shape[0] < n_chunks or dacc.shape[0] < n_chunks
          or work.shape[0] < n_threads):
        raise ValueError("grads and dacc need one row per chunk, work one per thread")
    elif dacc.shape[1] != n_params - b_off[0]:
        raise ValueError("dacc needs one column per intercept")
    if grads.shape[1] != n_params or state_1.shape[0] != n_params:
        raise ValueError("grads and state_1 must match theta's length")
    if solver == SOLVER_ADAM_ and state_2.shape[0] != n_params:
        raise ValueError("state_2 must match theta's length for Adam")
    if not units and ws < workspace_size(sizes, acts, per_chunk, X is not None, drop):
        raise ValueError("the workspace is too small for ceil(batch_size / n_chunks) rows")
    _fill(&sp, &inp, sizes, w_off, b_off, acts, out, per_chunk, X, data, indices, indptr,
          theta)
    if units:  # offsets of `upper` and of the gathered rows in a thread's row
        width = _part_width(sizes[1], C, sizeof(floating))
        z_at = _units_z_off(&sp, width)
        x_at = _units_x_off(&sp, width)
        deep = sp.n_layers > 2
        if deep:  # the layers above the first index the threads' copies of them
            w_off_u = np.asarray(w_off) - w_off[2]
            b_off_u = np.asarray(b_off) - w_off[2]
            sp_u = sp
            sp_u.w_off = &w_off_u[0]
            sp_u.b_off = &b_off_u[0]
    _fill_targets(&sp, Y, y_data, y_indices, y_indptr, &Y_p)
    n_rows = _n_rows(Y, y_indptr)
    for i in range(n):  # every row index the epoch will follow must exist
        if not 0 <= order[i] < n_rows:
            raise ValueError(f"order holds row {order[i]}, outside the {n_rows} rows")
    if drop is not None:  # checked by workspace_size: one rate in [0, 1) per hidden layer
        for i in range(drop.shape[0]):
            if drop[i] > 0:
                sp.drop = &drop[0]
        sp.drop_seed = drop_seed
        if row_keys is not None:
            if row_keys.shape[0] != n_rows:
                raise ValueError("row_keys needs one key per row")
            if row_keys.shape[0] > 0:
                sp.row_keys = &row_keys[0]
    if sample_weight is not None:
        sw = &sample_weight[0]
    if x_tops is not None:
        if X is None or x_tops.shape[0] < n_chunks:
            raise ValueError("x_tops needs dense X and one slot per chunk")
        tops_p = &x_tops[0]
    if n == 0:
        return 0.0, 0
    if shuffle:
        with nogil:
            _shuffle(order_p, n, seed)
    bar.count = 0
    bar.generation = 0
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        team = omp_get_num_threads()   # OpenMP may give fewer threads than asked
        budget = SPIN_MAX if spin else 0
        own = work_p + tid * ws   # this thread's first chunk or part
        if units:  # the zero bias of units_output (one hidden layer); the parts' blocks
            # of W_1 and state, and the first minibatch's penalty
            if not deep:
                memset(own + z_at + batch_size * sizes[2], 0,
                       _yrow_len(sizes[2]) * sizeof(floating))
            c = tid
            while c < C:
                units_move(&sp, theta_p, s1, s2, work_p + c * ws, c, C, True,
                           solver == SOLVER_ADAM_)
                parts_p[C + c] = units_sq(&sp, theta_p, work_p + c * ws, c, C) \
                    if alpha != 0.0 else 0.0
                c = c + team
            if deep:
                upper_move(&sp, theta_p, s1, s2, own, C, True, solver == SOLVER_ADAM_)
        total = 0.0
        n_batches = 0
        t = t0
        s_cos = cosine_start
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
            lr_b = learning_rate
            if cosine_steps > 0:
                lr_b = learning_rate * 0.5 * (
                    1.0 + cos(M_PI * <double> min(s_cos, cosine_steps) / cosine_steps))
                s_cos = s_cos + 1
            if solver == SOLVER_ADAM_:
                t = t + 1
                lr_t = lr_b * sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
            else:
                lr_t = lr_b
            c = tid
            if units:
                # The units split (unit_split.pxi): the parts' forward passes, one
                # barrier, then the output, the parts' gradients and steps.
                _gather_rows(&inp, order_p, start, nb, sizes[0], own + x_at)
                if tops_p != NULL and tid == 0:
                    _note_top(own + x_at, nb * sizes[0], tops_p)
                while c < C:
                    memset(dacc_p + c * n_int, 0, n_int * sizeof(double))
                    units_forward(&sp, theta_p, own + x_at, nb, work_p + c * ws, c, C, par)
                    c = c + team
                barrier_wait(bar_p, team, &budget)
                # Every thread stops on thread 0's loss of the minibatch before (0 before
                # the first), here, where all have crossed the same barriers; that
                # minibatch's step was the last (the forward passes since change no
                # parameter).
                if not isfinite(parts_p[(1 - par) * 2 * C]):
                    if solver == SOLVER_ADAM_:   # (this minibatch took no step)
                        t = t - 1
                    break
                delta = NULL   # (assigned here, so that each thread has its own)
                loss = units_output(&sp, &sp_u, work_p, ws, C, par, own, order_p, start,
                                    nb, Y_p, sw, scale, dacc_p + tid * n_int, &delta)
                sq = 0.0
                for k in range(C):
                    sq = sq + parts_p[par * 2 * C + C + k]
                c = tid
                while c < C:
                    units_backward(&sp, theta_p, grads_p, dacc_p + c * n_int, own + x_at,
                                   delta, nb, work_p + c * ws, c, C)
                    # (0 without a penalty: reduce_and_step sums no squares then)
                    parts_p[(1 - par) * 2 * C + C + c] = units_step(
                        &sp, theta_p, grads_p, dacc_p + c * n_int, work_p + c * ws, c, C,
                        scale, alpha, solver, lr_t, momentum, nesterov, beta_1, beta_2,
                        epsilon, s1, s2)
                    c = c + team
                if deep:  # every thread steps its copy alike; part 0 counts its squares
                    sq_up = upper_step(&sp, &sp_u, own, C, dacc_p + tid * n_int, scale,
                                       alpha, solver, lr_t, momentum, nesterov, beta_1,
                                       beta_2, epsilon)
                    if tid == 0:
                        parts_p[(1 - par) * 2 * C + C] += sq_up
            else:
                # Phase 1: this thread's chunks of the batch, each into its own buffers.
                rows_per = (nb + C - 1) // C
                while c < C:
                    lo = min(nb, c * rows_per)
                    hi = min(nb, lo + rows_per)
                    memset(dacc_p + c * n_int, 0, n_int * sizeof(double))
                    loss = 0.0
                    if hi > lo:
                        loss = block_pass(&sp, &inp, order_p, start + lo, hi - lo, Y_p,
                                          sw, scale, theta_p, grads_p + c * n_params,
                                          dacc_p + c * n_int, work_p + tid * ws, False,
                                          NULL)
                        if tops_p != NULL:   # the chunk's rows, still in block_pass's Xg
                            _note_top(work_p + tid * ws + _xg_offset(&sp),
                                      (hi - lo) * sizes[0], tops_p + c)
                    else:
                        memset(grads_p + c * n_params, 0, b_off[0] * sizeof(floating))
                    parts_p[par * 2 * C + c] = loss
                    c = c + team
                barrier_wait(bar_p, team, &budget)
                # Phase 2: this thread's slices of the parameters: reduce, then step.
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
            if units:   # (the stop comes after the next barrier, above)
                if tid == 0:
                    parts_p[par * 2 * C] = loss
            elif not isfinite(loss):
                break
            start = start + nb
            par = 1 - par
        c = tid
        while units and c < C:
            units_move(&sp, theta_p, s1, s2, work_p + c * ws, c, C, False,
                       solver == SOLVER_ADAM_)
            c = c + team
        if deep and tid == 0:
            upper_move(&sp, theta_p, s1, s2, own, C, False, solver == SOLVER_ADAM_)
        if tid == 0:
            result_p[0] = total
            result_p[1] = n_batches
            result_p[2] = <double> t
    step[0] = <long long> result[2]
    return result[0], int(result[1])
