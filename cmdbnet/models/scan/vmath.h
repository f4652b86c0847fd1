/* exp, log1p, softplus and sigmoid for the C library's loops (native.c, plane.c). */
#ifndef CMDB_VMATH_H
#define CMDB_VMATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp, log1p, softplus and sigmoid as straight-line code that the compiler vectorises (libm's
 * are calls it cannot vectorise without -ffast-math, which would also let it assume no NaN).
 * Cephes' single-precision polynomials, about 1 ulp; NaN in gives NaN out. */
static inline float as_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline int32_t as_int(float f) { int32_t i; memcpy(&i, &f, 4); return i; }

static inline float exp_f(float x) {
    const float xc = x > 88.f ? 88.f : (x < -87.f ? -87.f : (x == x ? x : 0.f));
    const float k = floorf(xc * 1.44269504088896341f + 0.5f);
    const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    float e = (p * r * r + r + 1.f) * as_float(((int32_t)k + 127) << 23);
    e = x > 88.f ? INFINITY : (x < -87.f ? 0.f : e);
    return x == x ? e : x;
}

/* log(u) for u in [1, 2]: the only range softplus needs. */
static inline float log_1_2(float u) {
    const int32_t bits = as_int(u);
    float e = (float)(((bits >> 23) & 0xff) - 126);
    float m = as_float((bits & 0x807fffff) | 0x3f000000);  /* u = m 2^e, m in [0.5, 1) */
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.f : e;
    m = small ? m + m - 1.f : m - 1.f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f; y = y * m + 1.1676998740e-1f; y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f; y = y * m - 1.6668057665e-1f; y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f; y = y * m + 3.3333331174e-1f;
    y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
    return m + y + e * 0.693359375f;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(v) = log(u) - ((u - 1) - v) / u with
 * u = 1 + v (the correction keeps it exact where u rounds); equals torch's past its threshold. */
static inline float softplus_f(float x) {
    const float v = exp_f(-fabsf(x)), u = 1.f + v;
    return (x > 0.f ? x : 0.f) + (log_1_2(u) - ((u - 1.f) - v) / u);
}

static inline float sigmoid_f(float x) { return 1.f / (1.f + exp_f(-x)); }

#endif
