/* Single-precision exp, expm1, log1p, tanh, sigmoid, softplus and the normal cdf that
 * compilers can vectorize.
 *
 * glibc's expf, expm1f, log1pf, tanhf and erfcf are scalar calls (12-16 ns each on the
 * machines we measured), so a loop over a layer that calls them runs one element at a
 * time and costs several times the GEMMs around it. The functions here are written for
 * the loops of fastbp/_kernels/layers.pxi:
 *
 *   - straight-line code only: argument reduction, a polynomial, bit operations to build
 *     powers of two, and selects (c ? a : b between values already computed) for the
 *     special cases. No branches, no calls, no tables, so GCC and Clang inline them and
 *     vectorize the caller's loop at whatever width the variant is built for;
 *   - only +, -, *, / and conversions, each correctly rounded by IEEE 754, and the
 *     kernels are built with -ffp-contract=off: every variant (SSE2, AVX2, AVX-512) and
 *     the scalar remainder of a loop round every operation alike, so they all return
 *     bitwise the same results (tests/test_dispatch.py);
 *   - accuracy within a few units in the last place of float over the whole range,
 *     including subnormal results, overflow to infinity, signed zeros, infinities and NaN
 *     (tests/test_vmath.py measures the worst error against float64 references on
 *     millions of arguments).
 *
 * Float64 keeps the C library (the precision users pick for accuracy, not speed), except
 * for exp (fbp_exp below, within an ulp like the C library's), which the softmax output
 * of float64 layers calls for every element.
 *
 * The methods are the textbook ones. exp and expm1: x = n ln2 + r with |r| <= ln2/2
 * (Cody-Waite, ln2 split in a 16-bit head and a tail so that n * head is exact), then
 * exp(x) = 2^n e^r with e^r from a fitted polynomial, and expm1(x) = 2^n expm1(r) +
 * (2^n - 1) with expm1(r) by its Taylor polynomial to degree 8 (truncation below 6e-10
 * relative). log1p: u = 1 + x rounded, u = 2^k m with m in [sqrt(2)/2, sqrt(2)),
 * log m = 2 atanh(s) with s = (m-1)/(m+1) by its odd series to s^11 (as f - s (f - ...),
 * f = m - 1 exact), plus the rounding error of 1 + x, (x - (u - 1)) / u. sigmoid and
 * softplus work from e = exp(-|v|), which never overflows.
 * tanh(|x|) = -e / (e + 2) with e = expm1(-2|x|). GELU's normal cdf: see fbp_ncdff.
 *
 * Polynomials are evaluated by Estrin's scheme (pairs c_k + c_(k+1) x, combined with x^2,
 * x^4), not Horner's: a vectorized loop's cost is the latency of its longest chain of
 * dependent operations, which this cuts from two per degree to about two per doubling of
 * the degree. The reordering moves the results by at most an ulp here and there; the
 * error bounds of tests/test_vmath.py hold as before.
 */
#ifndef FASTBP_VMATH_H
#define FASTBP_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float fbp_f32(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
static inline uint32_t fbp_u32(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static inline double fbp_f64(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }
static inline uint64_t fbp_u64(double f) { uint64_t u; memcpy(&u, &f, sizeof u); return u; }

/* x = n ln2 + r, |r| <= ln2/2 (a hair more where x * log2(e) rounds); n in *n.
 * Needs |x| < 2^8 ln2 so that n * FBP_LN2_HI is exact; the callers clamp x first. */
#define FBP_LN2_HI 0.693145751953125f          /* 16 significant bits */
#define FBP_LN2_LO 1.428606765330187045e-6f    /* ln2 - FBP_LN2_HI */
static inline float fbp_reduce(float x, int32_t *n)
{
    const float shift = 12582912.0f;           /* 1.5 * 2^23: adding it rounds to an integer */
    float k = x * 1.44269504088896341f + shift;
    float nf = k - shift;
    *n = (int32_t)(fbp_u32(k) - fbp_u32(shift));
    return (x - nf * FBP_LN2_HI) - nf * FBP_LN2_LO;
}

/* expm1(r) for |r| <= 0.35: Taylor to degree 8. */
static inline float fbp_expm1_poly(float r)
{
    float r2 = r * r;
    float q = ((0.5f + r * (1.0f / 6.0f)) + r2 * (1.0f / 24.0f + r * (1.0f / 120.0f)))
              + (r2 * r2) * ((1.0f / 720.0f + r * (1.0f / 5040.0f)) + r2 * (1.0f / 40320.0f));
    return r + r2 * q;
}

/* e^r for |r| <= 0.35, as 1 + (r + r^2 q(r)) with q of degree 4, fitted by least squares
 * at Chebyshev nodes to (e^r - 1 - r) / r^2 (within 1.3e-8 of e^r, relative, in float
 * arithmetic: two fewer steps than the Taylor polynomial expm1 needs). */
static inline float fbp_exp_poly(float r)
{
    float r2 = r * r;
    float q = (0.5f + r * 0.16666576266288757f)
              + r2 * ((0.041666463017463684f + r * 0.008363235741853714f)
                      + r2 * 0.0013933733571320772f);
    return 1.0f + (r + r2 * q);
}

/* 2^n as a float, for -126 <= n <= 127. */
static inline float fbp_pow2(int32_t n) { return fbp_f32((uint32_t)(n + 127) << 23); }

static inline float fbp_expf(float x)
{
    /* Clamp so that n stays in [-150, 129] (NaN passes through both comparisons). */
    float xc = x < -104.0f ? -104.0f : x;
    xc = xc > 89.0f ? 89.0f : xc;
    int32_t n;
    float p = fbp_exp_poly(fbp_reduce(xc, &n));
    /* 2^n in two normal factors, so that a subnormal result is rounded once, by the last
     * product, and a result beyond FLT_MAX overflows to infinity. */
    int32_t n1 = n >> 1;
    return (p * fbp_pow2(n1)) * fbp_pow2(n - n1);
}

/* Double-precision exp, written the same way (only +, -, *, bit operations and selects):
 * x = n ln2 + r with |r| <= ln2/2 (ln2 split into a head with 21 trailing zero bits, so
 * n * head is exact for |n| < 2^21, and a tail), e^r = (1 + r) + r^2 q(r) with q the
 * Taylor polynomial of (e^r - 1 - r) / r^2 to degree 11 (truncation below 4e-18
 * relative for |r| <= 0.35) and 1 + r carried with its rounding error, then 2^n in two
 * normal factors as in fbp_expf. Within 0.82 ulp over the whole range, measured on 5
 * million arguments (the C library's exp: 0.70); about one result in twenty is not the
 * correctly rounded one (tests/test_vmath.py); the softmax output of float64 layers
 * spends most of its time in exp, which the C library computes one call at a time. */
#define FBP_LN2_HI_D 6.93147180369123816490e-01    /* 0x3fe62e42fee00000 */
#define FBP_LN2_LO_D 1.90821492927058770002e-10    /* ln2 - FBP_LN2_HI_D */
static inline double fbp_exp(double x)
{
    /* Clamp so that n stays in [-1077, 1025] (NaN passes through both comparisons). */
    double xc = x < -746.0 ? -746.0 : x;
    xc = xc > 710.0 ? 710.0 : xc;
    const double shift = 6755399441055744.0;   /* 1.5 * 2^52: adding it rounds to an integer */
    double k = xc * 1.4426950408889634 + shift;
    double nf = k - shift;
    int64_t n = (int64_t) (fbp_u64(k) - fbp_u64(shift));
    double r = (xc - nf * FBP_LN2_HI_D) - nf * FBP_LN2_LO_D;
    double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    double q = ((1.0 / 2 + r * (1.0 / 6)) + r2 * (1.0 / 24 + r * (1.0 / 120)))
               + r4 * ((1.0 / 720 + r * (1.0 / 5040)) + r2 * (1.0 / 40320 + r * (1.0 / 362880)))
               + r8 * ((1.0 / 3628800 + r * (1.0 / 39916800))
                       + r2 * (1.0 / 479001600 + r * (1.0 / 6227020800.0)));
    /* 1 + r with its rounding error (exact, as |r| < 1), so that only the last addition
     * rounds at the result's scale. */
    double hi = 1.0 + r;
    double p = hi + (((1.0 - hi) + r) + r2 * q);
    int64_t n1 = n >> 1;
    double s1 = fbp_f64((uint64_t) (n1 + 1023) << 52);
    double s2 = fbp_f64((uint64_t) (n - n1 + 1023) << 52);
    return (p * s1) * s2;
}

static inline float fbp_expm1f(float x)
{
    /* expm1 is -1 in float below -17.4; beyond 88.73 it overflows (n = 128 at most). */
    float xc = x < -30.0f ? -30.0f : x;
    xc = xc > 89.0f ? 89.0f : xc;
    int32_t n;
    float em = fbp_expm1_poly(fbp_reduce(xc, &n));
    /* 2^n em + (2^n - 1), as 2 (h em + (h - 1/2)) with h = 2^(n-1): n = 128 still has a
     * float h, the doubling is exact or overflows to infinity, and n = 0 gives em. */
    float h = fbp_pow2(n - 1);
    float y = 2.0f * (h * em + (h - 0.5f));
    y = n == 0 ? em : y;                       /* no halving of a subnormal em */
    return x == 0.0f ? x : y;                  /* expm1(-0) = -0 */
}

static inline float fbp_log1pf(float x)
{
    float u = 1.0f + x;
    /* Offset the bits so that the exponent field gives k with m = u / 2^k in
     * [sqrt(2)/2, sqrt(2)). */
    uint32_t iu = fbp_u32(u) + (0x3f800000u - 0x3f3504f3u);
    int32_t k = (int32_t)(iu >> 23) - 127;
    float m = fbp_f32((iu & 0x007fffffu) + 0x3f3504f3u);
    float f = m - 1.0f;                        /* exact (Sterbenz) */
    float s = f / (2.0f + f);
    float s2 = s * s;
    float q = 2.0f / 11.0f;
    q = q * s2 + 2.0f / 9.0f;
    q = q * s2 + 2.0f / 7.0f;
    q = q * s2 + 2.0f / 5.0f;
    q = q * s2 + 2.0f / 3.0f;
    /* log m = 2s + s s2 q, with 2s = f - s f: f - s (f - s2 q) adds the small correction
     * to the exact f, so its rounding errors shrink with it. */
    float logm = f - s * (f - s2 * q);
    /* The rounding error of u = 1 + x: log(1 + x) = log(u) + log1p(c) ~ log(u) + c. */
    float c = (x - (u - 1.0f)) / u;
    float kf = (float)k;
    float y = kf * FBP_LN2_HI + (logm + (kf * FBP_LN2_LO + c));
    y = x < -1.0f ? NAN : y;
    y = x == -1.0f ? -INFINITY : y;
    y = x == INFINITY ? INFINITY : y;
    y = x == 0.0f ? x : y;                     /* log1p(-0) = -0 */
    return x != x ? x : y;
}

static inline float fbp_tanhf(float x)
{
    uint32_t ix = fbp_u32(x);
    float a = fbp_f32(ix & 0x7fffffffu);
    float e = fbp_expm1f(-2.0f * a);           /* in [-1, 0] */
    float t = -e / (e + 2.0f);                 /* >= 0, but -0 where e = +0 */
    return fbp_f32((fbp_u32(t) & 0x7fffffffu) | (ix & 0x80000000u));
}

/* The standard normal cdf Phi(z), returned, and pdf phi(z), in *pdf: what a GELU layer
 * needs (gelu(z) = z Phi(z), gelu'(z) = Phi(z) + z phi(z), gelu''(z) = phi(z) (2 - z^2)),
 * from one exp. E = exp(-z^2 / 2) with z^2 split exactly: zh keeps the top 12 bits of z,
 * so zh^2 / 2 is a float, and the argument reduction subtracts n ln2 from it exactly
 * before adding the small rest, so E keeps its relative accuracy far in the tail (a
 * rounded z^2 / 2 near 50 would be off by 2e-6 of E). phi = E / sqrt(2 pi). The tail
 * T = Phi(-|z|) = E t Q(t) with t = 1 / (1 + |z| / 4) and Q a degree-9 polynomial,
 * fitted by relative least squares at Chebyshev nodes of [0, 1] to T / (E t) (largest
 * error 4e-8); Phi(z) = T for z < 0, 1 - T otherwise. */
static inline float fbp_ncdff(float z, float *pdf)
{
    uint32_t iz = fbp_u32(z);
    float a = fbp_f32(iz & 0x7fffffffu);
    a = a > 14.5f ? 14.5f : a;                 /* E underflows to 0 beyond */
    float ah = fbp_f32(fbp_u32(a) & 0xfffff000u);
    float hi = 0.5f * (ah * ah);               /* exact */
    float lo = 0.5f * ((a - ah) * (a + ah));   /* a^2 / 2 = hi + lo */
    const float shift = 12582912.0f;
    float k = -(hi + lo) * 1.44269504088896341f + shift;
    float nf = k - shift;
    int32_t n = (int32_t)(fbp_u32(k) - fbp_u32(shift));
    float r = ((-hi - nf * FBP_LN2_HI) - lo) - nf * FBP_LN2_LO;
    float p = fbp_exp_poly(r);
    int32_t n1 = n >> 1;                       /* n in [-152, 0] */
    float e = (p * fbp_pow2(n1)) * fbp_pow2(n - n1);
    float t = 1.0f / (1.0f + 0.25f * a);
    float t2 = t * t;
    float t4 = t2 * t2;
    float q = ((0.0997355654835701f + t * 0.0997365415096283f)
               + t2 * (0.09346278756856918f + t * 0.08164728432893753f))
              + t4 * (((0.05870717018842697f + t * 0.06459580361843109f)
                       + t2 * (-0.033452946692705154f + t * 0.0975288525223732f))
                      + t4 * (-0.08202378451824188f + t * 0.020062735304236412f));
    float tail = (e * t) * q;
    *pdf = e * 0.398942280401432678f;
    float cdf = (iz >> 31) ? tail : 1.0f - tail;
    /* NaN: a > 14.5 is false for NaN, so the NaN runs through and both come out NaN. */
    return cdf;
}

/* sigmoid(v) = 1 / (1 + e^-v), as 1 / (1 + e) for v >= 0 and e / (1 + e) otherwise,
 * e = exp(-|v|), which never overflows. */
static inline float fbp_sigmoidf(float v)
{
    float e = fbp_expf(-fbp_f32(fbp_u32(v) & 0x7fffffffu));
    float inv = 1.0f / (1.0f + e);
    return v >= 0.0f ? inv : e * inv;
}

/* softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|), returned, and its derivative
 * sigmoid(v) in *deriv (1 / (1 + e) for v > 0, e / (1 + e) otherwise), sharing e and
 * 1 + e. log1p(e) for e in [0, 1] as in fbp_log1pf, without its special cases (u = 1 + e
 * lies in [1, 2], so k is 0 or 1). No overflow for any v; NaN gives NaN. */
static inline float fbp_softplusf(float v, float *deriv)
{
    float a = fbp_f32(fbp_u32(v) & 0x7fffffffu);
    float e = fbp_expf(-a);
    float u = 1.0f + e;
    float inv = 1.0f / u;
    float big = u > 1.41421356f ? 1.0f : 0.0f;
    float m = big > 0.0f ? 0.5f * u : u;       /* exact */
    float f = m - 1.0f;                        /* exact, in [sqrt(2)/2 - 1, sqrt(2) - 1] */
    /* log1p(f) = f - f^2/2 + f^3 g(f), g of degree 7 fitted by relative least squares at
     * Chebyshev nodes of that interval (no division, unlike fbp_log1pf's series). */
    float f2 = f * f;
    float g = ((0.3333335518836975f - f * 0.2500085234642029f)
               + f2 * (0.19999825954437256f - f * 0.16621370613574982f))
              + (f2 * f2) * ((0.14227114617824554f - f * 0.13202103972434998f)
                             + f2 * (0.1262032687664032f - f * 0.07362867891788483f));
    float logm = f - (0.5f * f2 - (f2 * f) * g);
    float c = (e - (u - 1.0f)) * inv;          /* the rounding error of 1 + e */
    float l = big * FBP_LN2_HI + (logm + (big * FBP_LN2_LO + c));
    *deriv = v > 0.0f ? inv : e * inv;
    return (v > 0.0f ? v : 0.0f) + l;
}

#endif
