# Elementwise layer kernels and the sparse first layer, for one block of n rows with m
# units in the layer (row-major arrays, f a hidden activation, g the output's):
#
#   bias_activate          Z <- f(Z + 1 b^T), in place; gelu, silu and softplus layers
#                          also write K: f'(z) in the gradient pass (from the values the
#                          forward pass computed anyway), z in the curvature pass
#   activation_backward    D <- D .* f'(A), db += colsum(D); f' from A = f(Z) where that
#                          is exact: logistic a(1-a), tanh 1-a^2, relu [a>0], identity 1,
#                          leaky_relu 1 or 0.01 by the sign of a, elu 1 or a+1; gelu,
#                          silu and softplus read f' from K (or compute it from K = z:
#                          Phi(z) + z phi(z), s(1 + z(1-s)) and s, s = sigmoid(z))
#   activation_deriv       M <- f'(A) for the activations that keep no K (a dropping
#                          layer's derivative, masked by block_pass.pxi's _drop_units)
#   output_activate        Z <- g(Z + 1 b^T), no loss (predictions)
#   output_loss_backward   Z <- Delta_L, Delta_L[i] = dloss_i/dz_i * w_i * scale
#                          (= (g(z_i) - y_i) w_i scale for a proper target),
#                          db += colsum(Delta_L); returns sum_i w_i loss_i in float64
#   sparse_forward         Z = X[rows] W_1 for CSR X, never densified
#   sparse_backward        dW_1 (+)= X[rows]^T D for CSR X
#
# The scalar helpers below give f, f' and f'' of the activations that need more than one
# expression; curvature.pxi uses them too. Float32 runs the vectorizable float math of
# fastbp/_vmath.h: every loop below is straight-line code the compiler vectorizes (a
# select such as v > 0 ? v : e takes values already computed), so elu, gelu, silu,
# softplus, tanh and logistic cost a few vector instructions per element, not a libm
# call. Float64 calls the C library's double math, but for exp (_vmath.h's fbp_exp).
# Intercept sums (db) are float64, added row by row in row order. noexcept nogil and
# allocation-free. Callers: block_pass.pxi (the gradient pass), curvature.pxi and
# fisher.pxi.

cdef inline floating _sigmoid(floating z) noexcept nogil:
    """1 / (1 + e^-z): for float _vmath.h's fbp_sigmoidf."""
    if floating is float:
        return fbp_sigmoidf(z)
    else:
        return 1 / (1 + _exp(-z))


cdef inline double _gelu_cdf(double z) noexcept nogil:
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2, as erfc(-z / sqrt 2) / 2: the same number,
    without the cancellation of 1 + erf in the left tail (float64 layers)."""
    return 0.5 * erfc(-z * 0.7071067811865476)


cdef inline double _gelu_pdf(double z) noexcept nogil:
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi); 0 where z^2 overflows (float64 layers)."""
    return exp(-0.5 * z * z) * 0.3989422804014327


cdef inline floating _gelu_parts(floating z, floating* pdf) noexcept nogil:
    """Phi(z), returned, and phi(z), in pdf[0]: for float from one exp (_vmath.h's
    fbp_ncdff), for double from the C library's erfc and exp."""
    cdef float p32
    cdef floating c
    if floating is float:
        c = fbp_ncdff(z, &p32)
        pdf[0] = p32
        return c
    else:
        pdf[0] = _gelu_pdf(z)
        return _gelu_cdf(z)


cdef inline floating _softplus_parts(floating v, floating* deriv) noexcept nogil:
    """softplus(v), returned, and sigmoid(v), in deriv[0], from one exp: for float
    _vmath.h's fbp_softplusf, for double the C library's."""
    cdef float d32
    cdef floating e, y
    if floating is float:
        y = fbp_softplusf(v, &d32)
        deriv[0] = d32
        return y
    else:
        # max(v, 0) + log1p(e^-|v|): no overflow for any v.
        e = _exp(-v if v > 0 else v)
        deriv[0] = 1 / (1 + e) if v > 0 else e / (1 + e)
        return (v if v > 0 else 0) + _log1p(e)


cdef inline floating _gelu_d1(floating z) noexcept nogil:
    """GELU's f'(z) = Phi(z) + z phi(z)."""
    cdef floating p
    cdef floating c = _gelu_parts(z, &p)
    return c + z * p


cdef inline floating _silu_d1(floating z) noexcept nogil:
    """SiLU's f'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    cdef floating s = _sigmoid(z), one = 1
    return s * (one + z * (one - s))


cdef void bias_activate(floating* Z, const floating* b, floating* K, Py_ssize_t n,
                        Py_ssize_t m, int act, bint keep_deriv) noexcept nogil:
    """Z (n, m) <- f(Z + b) in place, for a hidden activation f. For the layers that
    keep a second array (gelu, silu, softplus; _z_code), K (n, m) receives f'(z) when
    keep_deriv (the gradient pass: activation_backward then only multiplies) or z = Z + b
    (the curvature pass, whose f'' needs z); NULL for the others."""
    cdef Py_ssize_t i, j
    cdef floating* z
    cdef floating* k
    cdef floating v, e, d, c, p, s
    cdef floating one = 1  # literals would be double: keep the layer's precision
    for i in range(n):
        z = Z + i * m
        k = K + i * m if K != NULL else NULL
        # Every branch computes its values first and then selects, so that each loop is
        # straight-line code the compiler vectorizes.
        if act == ACT_RELU:
            for j in range(m):
                v = z[j] + b[j]
                z[j] = v if v > 0 else 0
        elif act == ACT_TANH:
            for j in range(m):
                z[j] = _tanh(z[j] + b[j])
        elif act == ACT_LOGISTIC:
            for j in range(m):
                z[j] = _sigmoid(z[j] + b[j])
        elif act == ACT_LEAKY_RELU:
            for j in range(m):
                v = z[j] + b[j]
                z[j] = v if v > 0 else v * <floating> 0.01
        elif act == ACT_ELU:
            for j in range(m):
                v = z[j] + b[j]
                e = _expm1(v)
                z[j] = v if v > 0 else e
        elif act == ACT_SOFTPLUS:
            for j in range(m):
                v = z[j] + b[j]
                z[j] = _softplus_parts(v, &d)
                k[j] = d if keep_deriv else v
        elif act == ACT_GELU:
            for j in range(m):
                v = z[j] + b[j]
                c = _gelu_parts(v, &p)
                z[j] = v * c
                if keep_deriv:
                    k[j] = c + v * p
                else:
                    k[j] = v
        elif act == ACT_SILU:
            for j in range(m):
                v = z[j] + b[j]
                s = _sigmoid(v)
                z[j] = v * s
                if keep_deriv:
                    k[j] = s * (one + v * (one - s))
                else:
                    k[j] = v
        else:
            for j in range(m):
                z[j] = z[j] + b[j]


cdef void activation_backward(floating* D, const floating* A, const floating* K,
                              Py_ssize_t n, Py_ssize_t m, int act, bint keep_deriv,
                              double* db) noexcept nogil:
    """D (n, m) <- D .* f'(A) in place, with f' written in terms of A = f(Z), or, for the
    layers that keep K (gelu, silu, softplus), read from K (keep_deriv: K holds f'(z), as
    bias_activate left it) or computed from K = z. With keep_deriv, a K given for any
    activation is the derivative to multiply by (a dropping layer's masked M).

    Adds the column sums of the result to db (m,), in float64.
    """
    cdef Py_ssize_t i, j
    cdef floating* d
    cdef const floating* a
    cdef const floating* k
    cdef floating one = 1  # literals would be double: keep the layer's precision
    for i in range(n):
        d = D + i * m
        a = A + i * m
        k = K + i * m if K != NULL else NULL
        # Branch-free selects (a data-dependent branch per element mispredicts half the
        # time for relu); the float64 column sums run in their own loop so that both
        # loops vectorize.
        if keep_deriv and k != NULL:
            for j in range(m):
                d[j] = d[j] * k[j]
        elif act == ACT_RELU:
            for j in range(m):
                d[j] = d[j] if a[j] > 0 else 0
        elif act == ACT_TANH:
            for j in range(m):
                d[j] = d[j] * (one - a[j] * a[j])
        elif act == ACT_LOGISTIC:
            for j in range(m):
                d[j] = d[j] * a[j] * (one - a[j])
        elif act == ACT_LEAKY_RELU:
            for j in range(m):
                d[j] = d[j] if a[j] > 0 else d[j] * <floating> 0.01
        elif act == ACT_ELU:
            for j in range(m):
                d[j] = d[j] if a[j] > 0 else d[j] * (a[j] + one)
        elif act == ACT_SOFTPLUS:
            for j in range(m):
                d[j] = d[j] * _sigmoid(k[j])
        elif act == ACT_GELU:
            for j in range(m):
                d[j] = d[j] * _gelu_d1(k[j])
        elif act == ACT_SILU:
            for j in range(m):
                d[j] = d[j] * _silu_d1(k[j])
        for j in range(m):
            db[j] += d[j]


cdef void activation_deriv(floating* M, const floating* A, Py_ssize_t n, Py_ssize_t m,
                           int act) noexcept nogil:
    """M (n, m) <- f'(A), written in terms of A = f(Z), for the activations that keep no
    K (the same expressions as activation_backward's): a dropping layer's derivative."""
    cdef Py_ssize_t i, nm = n * m
    cdef floating one = 1
    if act == ACT_RELU:
        for i in range(nm):
            M[i] = 1 if A[i] > 0 else 0
    elif act == ACT_TANH:
        for i in range(nm):
            M[i] = one - A[i] * A[i]
    elif act == ACT_LOGISTIC:
        for i in range(nm):
            M[i] = A[i] * (one - A[i])
    elif act == ACT_LEAKY_RELU:
        for i in range(nm):
            M[i] = 1 if A[i] > 0 else <floating> 0.01
    elif act == ACT_ELU:
        for i in range(nm):
            M[i] = 1 if A[i] > 0 else A[i] + one
    else:
        for i in range(nm):
            M[i] = 1


cdef void output_activate(floating* Z, const floating* b, Py_ssize_t n, Py_ssize_t m,
                          int out) noexcept nogil:
    """Z (n, m) <- g(Z + b) in place, for an output activation g (no loss)."""
    cdef Py_ssize_t i, j
    cdef floating* z
    cdef floating mx, s, one = 1
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
                z[j] = one / (one + _exp(-z[j]))
        elif out == OUT_EXP:
            for j in range(m):
                z[j] = _exp(z[j])


cdef enum:
    SOFTMAX_ROWS = 8   # rows whose softmax sums _softmax_loss_backward interleaves


cdef double _softmax_loss_backward(floating* Z, const floating* b, const floating* Y,
                                   const Spec* sp, floating* yrow, const double* sw,
                                   const Py_ssize_t* rows, Py_ssize_t start, Py_ssize_t n,
                                   Py_ssize_t m, double scale, double* db) noexcept nogil:
    """output_loss_backward for the softmax output, SOFTMAX_ROWS rows at a time (one
    with sparse targets, which share one yrow): every row's sums run in index order
    (float64, never reassociated) and its exponentials (_vmath.h's) in a loop of their
    own, which vectorizes; taking a group of rows through each step in turn lets their
    sums' chains of dependent additions overlap, where one row's waited on each
    addition's latency. The results are those of one row at a time, bit for bit, and
    db and the loss take the rows in order."""
    cdef Py_ssize_t i0, i, j, r, q, g, G = 1 if sp.y_indptr != NULL else SOFTMAX_ROWS
    cdef floating* zq[SOFTMAX_ROWS]
    cdef const floating* yq[SOFTMAX_ROWS]
    cdef floating mx[SOFTMAX_ROWS]
    cdef double wq[SOFTMAX_ROWS]
    cdef double yz[SOFTMAX_ROWS]
    cdef double ysum[SOFTMAX_ROWS]
    cdef double s[SOFTMAX_ROWS]
    cdef floating* z
    cdef const floating* y
    cdef floating p, c
    cdef double lse, total = 0.0
    i0 = 0
    while i0 < n:
        g = min(G, n - i0)
        for q in range(g):
            i = i0 + q
            r = rows[start + i] if rows != NULL else start + i
            yq[q] = _target_row(sp, Y, r, m, yrow)
            wq[q] = sw[r] if sw != NULL else 1.0
            z = Z + i * m
            zq[q] = z
            for j in range(m):
                z[j] = z[j] + b[j]
            mx[q] = z[0]
            yz[q] = 0.0
            ysum[q] = 0.0
            s[q] = 0.0
        for j in range(1, m):
            for q in range(g):
                if zq[q][j] > mx[q]:
                    mx[q] = zq[q][j]
        for j in range(m):
            for q in range(g):
                yz[q] += <double> yq[q][j] * zq[q][j]
                ysum[q] += yq[q][j]
        for q in range(g):
            z = zq[q]
            for j in range(m):
                z[j] = _exp(z[j] - mx[q])
        for j in range(m):
            for q in range(g):
                s[q] += zq[q][j]
        for q in range(g):
            z = zq[q]
            y = yq[q]
            c = <floating> (wq[q] * scale)
            lse = mx[q] + log(s[q])
            for j in range(m):
                # d/dz of sum(y) lse(z) - y.z: exact also when a row of Y is not one-hot.
                p = <floating> (ysum[q] * z[j] / s[q])
                z[j] = (p - y[j]) * c
                db[j] += z[j]
            total += wq[q] * (ysum[q] * lse - yz[q])
        i0 += g
    return total


cdef double output_loss_backward(floating* Z, const floating* b, const floating* Y,
                                 const Spec* sp, floating* yrow,
                                 const double* sw, const Py_ssize_t* rows, Py_ssize_t start,
                                 Py_ssize_t n, Py_ssize_t m, int out, double scale,
                                 double* db) noexcept nogil:
    """Output layer with its canonical loss, for one block.

    Z (n, m): pre-activations without the bias on entry, Delta_L on exit, where
    Delta_L[i] = dloss_i/dz_i * w_i * scale (= (g(z_i) - y_i) w_i scale for a proper target). Y (n_total, m) and sw (n_total,) are indexed
    by rows[start + i] (or start + i when rows is NULL); with sparse targets (sp's CSR
    fields) each row of Y is scattered into yrow (m,) first. Adds colsum(Delta_L) to db.
    Returns sum_i w_i * loss_i in float64. The losses are computed from z, exactly:
      softmax   logsumexp(z) * sum(y) - y.z
      logistic  sum_j softplus(z_j) - y_j z_j
      identity  0.5 * ||z - y||^2
      exp       sum_j exp(z_j) - y_j z_j - y_j + y_j log y_j
    """
    cdef Py_ssize_t i, j, r
    cdef floating* z
    cdef const floating* y
    cdef floating p, c, one = 1
    cdef double w, li, zj, total = 0.0
    if out == OUT_SOFTMAX:
        return _softmax_loss_backward(Z, b, Y, sp, yrow, sw, rows, start, n, m, scale, db)
    for i in range(n):
        r = rows[start + i] if rows != NULL else start + i
        y = _target_row(sp, Y, r, m, yrow)
        w = sw[r] if sw != NULL else 1.0
        c = <floating> (w * scale)
        z = Z + i * m
        for j in range(m):
            z[j] = z[j] + b[j]
        li = 0.0
        if out == OUT_LOGISTIC:
            for j in range(m):
                zj = z[j]
                li += (zj if zj > 0 else 0.0) + log1p(exp(-fabs(zj))) - y[j] * zj
                p = one / (one + _exp(-z[j]))
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
