# Update rules over the flat vector (scikit-learn's formulas), in place, elementwise in
# index order, in the network's dtype:
#
#   SGD    v = mu v - lr g;  theta += v        (Nesterov: theta += mu v - lr g)
#   Adam   m1 = b1 m1 + (1-b1) g;  m2 = b2 m2 + (1-b2) g^2;
#          theta -= lr_t m1 / (sqrt(m2) + eps),  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)
#
# sgd_step and adam_step (noexcept nogil, no allocation) step any slice of the vector,
# and can take the sum of squares of its coefficients in the same pass: epoch.pxi's
# reduce_and_step steps each thread's slices with them. sgd_update and adam_update step
# the whole vector once, for tests/test_core.py.

cdef void sgd_step(floating* theta, floating* grad, floating* velocity, Py_ssize_t n,
                   double lr, double momentum, bint nesterov, Py_ssize_t n_l2=0,
                   floating a=0, double* sq=NULL, bint sq_after=False) noexcept nogil:
    """velocity = momentum * velocity - lr * grad; theta += velocity, or with Nesterov
    theta += momentum * velocity - lr * grad. The first n_l2 entries first get the L2
    term, grad += a * theta (written back to grad), in the same pass; with ``sq`` not
    NULL, ``sq[0]`` gets their sum of squares before the step (after it with
    ``sq_after``), as _sum_squares sums."""
    cdef Py_ssize_t i, i0, k, n32 = n_l2 - n_l2 % 32 if sq != NULL else 0
    cdef floating mu = <floating> momentum, eta = <floating> lr, t, v
    cdef double acc[32]
    cdef double tail = 0.0
    if sq != NULL:
        for k in range(32):
            acc[k] = 0.0
        for i0 in range(0, n32, 32):
            for k in range(32):
                t = theta[i0 + k]
                grad[i0 + k] = grad[i0 + k] + a * t
                _sgd_one(theta, grad, velocity, i0 + k, mu, eta, nesterov)
                v = theta[i0 + k] if sq_after else t
                acc[k] += (<double> v) * v
    for i in range(n32, n_l2):
        t = theta[i]
        grad[i] = grad[i] + a * t
        _sgd_one(theta, grad, velocity, i, mu, eta, nesterov)
        v = theta[i] if sq_after else t
        tail += (<double> v) * v
    for i in range(n_l2, n):
        _sgd_one(theta, grad, velocity, i, mu, eta, nesterov)
    if sq != NULL:
        sq[0] = _fold32(acc, tail)


cdef inline void _sgd_one(floating* theta, const floating* grad, floating* velocity,
                          Py_ssize_t i, floating mu, floating eta, bint nesterov
                          ) noexcept nogil:
    cdef floating g = grad[i]
    cdef floating v = mu * velocity[i] - eta * g
    velocity[i] = v
    if nesterov:
        theta[i] = theta[i] + (mu * v - eta * g)
    else:
        theta[i] = theta[i] + v


cdef void adam_step(floating* theta, floating* grad, floating* m1, floating* m2,
                    Py_ssize_t n, double lr_t, double beta_1, double beta_2,
                    double epsilon, Py_ssize_t n_l2=0, floating a=0,
                    double* sq=NULL, bint sq_after=False) noexcept nogil:
    """m1 = b1 m1 + (1-b1) g; m2 = b2 m2 + (1-b2) g^2; theta -= lr_t m1 / (sqrt(m2) + eps),
    where lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t) is computed by the caller. The first
    n_l2 entries first get the L2 term, g = grad + a * theta (written back to grad), in
    the same pass: one pass over the parameters instead of two. With ``sq`` not NULL,
    ``sq[0]`` gets the sum of squares of those n_l2 entries before the step (after it
    with ``sq_after``), in _sum_squares' order (bitwise its result), also in the same
    pass: the step is bound by its division and square root, which leave the
    multiply-adds of the sum free."""
    cdef Py_ssize_t i, i0, k, n32 = n_l2 - n_l2 % 32 if sq != NULL else 0
    cdef floating g, t, u, v, b1 = <floating> beta_1, b2 = <floating> beta_2
    cdef floating c1 = <floating> (1 - beta_1), c2 = <floating> (1 - beta_2)
    cdef floating eta = <floating> lr_t, eps = <floating> epsilon
    cdef double acc[32]
    cdef double tail = 0.0
    if sq != NULL:
        for k in range(32):
            acc[k] = 0.0
        for i0 in range(0, n32, 32):
            for k in range(32):
                i = i0 + k
                t = theta[i]
                g = grad[i] + a * t
                grad[i] = g
                m1[i] = b1 * m1[i] + c1 * g
                m2[i] = b2 * m2[i] + c2 * g * g
                u = t - eta * m1[i] / (_sqrt(m2[i]) + eps)
                theta[i] = u
                v = u if sq_after else t
                acc[k] += (<double> v) * v
    for i in range(n32, n_l2):
        t = theta[i]
        g = grad[i] + a * t
        grad[i] = g
        m1[i] = b1 * m1[i] + c1 * g
        m2[i] = b2 * m2[i] + c2 * g * g
        u = t - eta * m1[i] / (_sqrt(m2[i]) + eps)
        theta[i] = u
        v = u if sq_after else t
        tail += (<double> v) * v
    for i in range(n_l2, n):
        g = grad[i]
        m1[i] = b1 * m1[i] + c1 * g
        m2[i] = b2 * m2[i] + c2 * g * g
        theta[i] = theta[i] - eta * m1[i] / (_sqrt(m2[i]) + eps)
    if sq != NULL:
        sq[0] = _fold32(acc, tail)


def sgd_update(floating[::1] theta, floating[::1] grad, floating[::1] velocity,
               double learning_rate, double momentum, bint nesterov, Py_ssize_t n_l2=0,
               double a=0.0):
    """One SGD/momentum/Nesterov step over the flat vector, in place. With n_l2 > 0 the
    first n_l2 entries take the L2 term a * theta first (added into grad), and the sum
    of their squares before the step is returned (else None)."""
    cdef double sq = 0.0
    _check_l2(theta.shape[0], n_l2)
    if not (theta.shape[0] == grad.shape[0] == velocity.shape[0]):
        raise ValueError("theta, grad and velocity must have the same length")
    with nogil:
        sgd_step(&theta[0], &grad[0], &velocity[0], theta.shape[0], learning_rate,
                 momentum, nesterov, n_l2, <floating> a, &sq if n_l2 > 0 else NULL)
    return sq if n_l2 > 0 else None


def adam_update(floating[::1] theta, floating[::1] grad, floating[::1] m1,
                floating[::1] m2, long long t, double learning_rate, double beta_1,
                double beta_2, double epsilon, Py_ssize_t n_l2=0, double a=0.0):
    """One Adam step (t is the step number, from 1) over the flat vector, in place. n_l2
    and a as for sgd_update."""
    cdef double lr_t, sq = 0.0
    _check_l2(theta.shape[0], n_l2)
    if not (theta.shape[0] == grad.shape[0] == m1.shape[0] == m2.shape[0]):
        raise ValueError("theta, grad, m1 and m2 must have the same length")
    if t < 1:
        raise ValueError(f"t counts Adam steps from 1, got {t}")
    lr_t = learning_rate * sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
    with nogil:
        adam_step(&theta[0], &grad[0], &m1[0], &m2[0], theta.shape[0], lr_t, beta_1,
                  beta_2, epsilon, n_l2, <floating> a, &sq if n_l2 > 0 else NULL)
    return sq if n_l2 > 0 else None


cdef _check_l2(Py_ssize_t n, Py_ssize_t n_l2):
    if not 0 <= n_l2 <= n:
        raise ValueError(f"n_l2 must be in [0, {n}], got {n_l2}")
