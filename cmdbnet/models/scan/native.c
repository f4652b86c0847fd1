/* The selective scan on CPU in fp32: forward and backward, one sequence at a time.
 *
 * Compiled at first use by cmdbnet/models/scan/native.py and called through ctypes. Why C:
 * at the network's shapes (d_state 1) a time step is a handful of flops per channel, so any
 * op-per-step torch scan is bound by per-op overhead and by passes over memory; here each
 * channel's sequence is contiguous, the pointwise work (softplus, exp, products) runs in
 * vectorisable loops over time, and only the recurrence itself stays a dependent loop.
 *
 * Layouts (all contiguous): u, delta, z, out, gu, gdelta, gz (B, D, L); Bm, Cm, gB, gC
 * (B, G, N, L); A (D, N); Dv, bias (D); last, glast (B, D, N); per-batch reductions gA
 * (B, D, N), gD (B, D), gbias (B, D). One call handles the (batch, group) units [lo, hi):
 * a unit owns its rows of gB and gC, so callers may run disjoint ranges in parallel threads.
 * Optional tensors are NULL. The initial state is zero, as in mamba-ssm. Forward may keep each
 * sequence's dt (B, D, L) and states (B, D, N, L) for backward, which then skips recomputing
 * them (the softplus and the recurrence were most of its time).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

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

/* Sum in double, eight lanes at a time: a plain float reduction would not vectorise without
 * letting the compiler reorder every sum (-ffast-math). */
static double sum_f(const float *x, i64 L) {
    double acc[8] = {0}, s = 0.0;
    i64 t = 0;
    for (; t + 8 <= L; t += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[t + j];
    for (; t < L; t++) s += x[t];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* Per-thread scratch: seven sequences of L floats and the states of one channel (N * L). */
typedef struct { float *dt, *pre, *da, *bu, *gy, *gh, *gdt, *h; } Work;

static int work_alloc(Work *w, i64 L, i64 N) {
    float *p = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1) * (size_t)(7 + N));
    if (!p) return -1;
    w->dt = p; w->pre = p + L; w->da = p + 2 * L; w->bu = p + 3 * L; w->gy = p + 4 * L;
    w->gh = p + 5 * L; w->gdt = p + 6 * L; w->h = p + 7 * L;
    return 0;
}

/* delta (+ bias) into w->pre (before softplus); returns the steps dt: ``kept`` when forward
 * kept them, else w->dt filled with softplus(pre) or pre. */
static const float *load_delta(Work *w, const float *dl, float bias, int softplus, const float *kept, i64 L) {
    for (i64 t = 0; t < L; t++) w->pre[t] = dl[t] + bias;
    if (kept) return kept;
    if (softplus) for (i64 t = 0; t < L; t++) w->dt[t] = softplus_f(w->pre[t]);
    else memcpy(w->dt, w->pre, sizeof(float) * (size_t)L);
    return w->dt;
}

/* The states h_t = exp(dt_t a) h_{t-1} + dt_t B_t u_t of one channel and one n, into h;
 * da gets the decays. Returns the last state. With h NULL, only the decays. */
static float states(Work *w, const float *dt, const float *uu, const float *Bn, float a, float *h, i64 L) {
    float *da = w->da, *bu = w->bu;
    if (!h) {  /* the states are known: only the decays are wanted */
        for (i64 t = 0; t < L; t++) da[t] = exp_f(dt[t] * a);
        return 0.f;
    }
    for (i64 t = 0; t < L; t++) { da[t] = exp_f(dt[t] * a); bu[t] = dt[t] * Bn[t] * uu[t]; }
    float s = 0.f;
    for (i64 t = 0; t < L; t++) { s = da[t] * s + bu[t]; h[t] = s; }
    return s;
}

int cmdb_scan_fwd(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
                  const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                  const float *Dv, const float *z, const float *bias, int softplus,
                  float *out, float *last, float *keep_dt, float *keep_h) {
    Work w;
    if (work_alloc(&w, L, N)) return -1;
    const i64 dg = D / G;
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit / G, g = unit % G;
        for (i64 d = g * dg; d < (g + 1) * dg; d++) {
            const i64 row = (b * D + d) * L;
            const float *uu = u + row;
            float *y = out + row;
            const float *dt = load_delta(&w, delta + row, bias ? bias[d] : 0.f, softplus, NULL, L);
            if (keep_dt) memcpy(keep_dt + row, dt, sizeof(float) * (size_t)L);
            const float dd = Dv ? Dv[d] : 0.f;
            for (i64 t = 0; t < L; t++) y[t] = dd * uu[t];
            for (i64 n = 0; n < N; n++) {
                const float *Bn = Bm + ((b * G + g) * N + n) * L, *Cn = Cm + ((b * G + g) * N + n) * L;
                /* one n at a time: only this n's states are needed, unless backward keeps them */
                float *h = keep_h ? keep_h + ((b * D + d) * N + n) * L : w.h;
                float s = states(&w, dt, uu, Bn, A[d * N + n], h, L);
                for (i64 t = 0; t < L; t++) y[t] += h[t] * Cn[t];
                if (last) last[(b * D + d) * N + n] = s;
            }
            if (z) {
                const float *zz = z + row;
                for (i64 t = 0; t < L; t++) y[t] *= zz[t] * sigmoid_f(zz[t]);
            }
        }
    }
    free(w.dt);
    return 0;
}

/* Gradients of one call. gu, gdelta, gz, gB, gC are written (gB, gC zeroed per unit here);
 * gA, gD, gbias get this batch row's sums (the caller adds the rows up). */
int cmdb_scan_bwd(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
                  const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                  const float *Dv, const float *z, const float *bias, int softplus,
                  const float *gout, const float *glast,
                  float *gu, float *gdelta, float *gA, float *gB, float *gC, float *gD, float *gz,
                  float *gbias, const float *kept_dt, const float *kept_h) {
    Work w;
    if (work_alloc(&w, L, N)) return -1;
    const i64 dg = D / G;
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit / G, g = unit % G;
        memset(gB + (b * G + g) * N * L, 0, sizeof(float) * (size_t)(N * L));
        memset(gC + (b * G + g) * N * L, 0, sizeof(float) * (size_t)(N * L));
        for (i64 d = g * dg; d < (g + 1) * dg; d++) {
            const i64 row = (b * D + d) * L;
            const float *uu = u + row, *go = gout + row;
            const float dd = Dv ? Dv[d] : 0.f;
            const float *dt = load_delta(&w, delta + row, bias ? bias[d] : 0.f, softplus,
                                         kept_dt ? kept_dt + row : NULL, L);
            float *gy = w.gy, *gh = w.gh, *gdt = w.gdt, *da = w.da;
            /* gy: the gradient reaching y before the gate; the gate's own gradient needs y. */
            if (z) {
                const float *zz = z + row;
                float *gzz = gz + row;
                for (i64 t = 0; t < L; t++) gzz[t] = dd * uu[t];  /* y before the gate, built up */
                for (i64 n = 0; n < N; n++) {
                    const i64 bn = ((b * G + g) * N + n) * L;
                    const float *h = kept_h ? kept_h + ((b * D + d) * N + n) * L : w.h;
                    if (!kept_h) states(&w, dt, uu, Bm + bn, A[d * N + n], w.h, L);
                    for (i64 t = 0; t < L; t++) gzz[t] += h[t] * Cm[bn + t];
                }
                for (i64 t = 0; t < L; t++) {
                    const float sg = sigmoid_f(zz[t]), silu = zz[t] * sg;
                    gzz[t] *= go[t] * (sg + silu * (1.f - sg));
                    gy[t] = go[t] * silu;
                }
            } else {
                memcpy(gy, go, sizeof(float) * (size_t)L);
            }
            float *gux = gu + row;
            for (i64 t = 0; t < L; t++) { gux[t] = gy[t] * dd; gdt[t] = 0.f; w.bu[t] = gy[t] * uu[t]; }
            if (gD) gD[b * D + d] = (float)sum_f(w.bu, L);
            for (i64 n = 0; n < N; n++) {
                const i64 bn = ((b * G + g) * N + n) * L;
                const float *Bn = Bm + bn, *Cn = Cm + bn, a = A[d * N + n];
                float *h = kept_h ? (float *)kept_h + ((b * D + d) * N + n) * L : w.h;
                states(&w, dt, uu, Bn, a, kept_h ? NULL : h, L);
                /* Reverse-time: gh_t = gy_t C_t + exp(dt_{t+1} a) gh_{t+1}, the only dependent loop. */
                float s = glast ? glast[(b * D + d) * N + n] : 0.f;
                for (i64 t = L - 1; t >= 0; t--) {
                    s += gy[t] * Cn[t];
                    gh[t] = s;
                    s *= da[t];
                }
                float *gBn = gB + bn, *gCn = gC + bn, *gAt = w.bu;  /* bu is free again */
                for (i64 t = 0; t < L; t++) {
                    gCn[t] += gy[t] * h[t];
                    gBn[t] += gh[t] * dt[t] * uu[t];
                    gux[t] += gh[t] * dt[t] * Bn[t];
                    gdt[t] += gh[t] * Bn[t] * uu[t];
                }
                gAt[0] = 0.f;  /* the state before t = 0 is zero */
                for (i64 t = 1; t < L; t++) {
                    const float gdA = gh[t] * h[t - 1] * da[t];  /* dL/d(dt_t a) */
                    gdt[t] += gdA * a;
                    gAt[t] = gdA * dt[t];
                }
                if (gA) gA[(b * D + d) * N + n] = (float)sum_f(gAt, L);
            }
            float *gdl = gdelta + row;
            if (softplus) for (i64 t = 0; t < L; t++) gdl[t] = gdt[t] * sigmoid_f(w.pre[t]);
            else memcpy(gdl, gdt, sizeof(float) * (size_t)L);
            if (gbias) gbias[b * D + d] = (float)sum_f(gdl, L);
        }
    }
    free(w.dt);
    return 0;
}

/* The four scan orders of SS2D (row-major, column-major, both reversed) as index maps between
 * an (H, W) plane in row-major order and the sequences the scan runs over. cmdb_cross_expand
 * is the cross-scan, (B, D, H, W) -> (B, 4, D, L); cmdb_cross_fold its adjoint, the cross-merge,
 * (B, 4, D, L) -> (B, D, L) summed. One pass each instead of the stack, flips, transposes and
 * adds that torch needs. Units are (batch, channel) planes. */

/* dst (W, H) <- src (H, W) transposed, in 16 x 16 tiles that stay in L1. */
static void transpose_plane(const float *src, float *dst, i64 H, i64 W) {
    for (i64 h0 = 0; h0 < H; h0 += 16)
        for (i64 w0 = 0; w0 < W; w0 += 16) {
            const i64 h1 = h0 + 16 < H ? h0 + 16 : H, w1 = w0 + 16 < W ? w0 + 16 : W;
            for (i64 h = h0; h < h1; h++)
                for (i64 w = w0; w < w1; w++) dst[w * H + h] = src[h * W + w];
        }
}

int cmdb_cross_expand(i64 lo, i64 hi, i64 D, i64 H, i64 W, const float *x, float *xs) {
    const i64 L = H * W;
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit / D, d = unit % D;
        const float *src = x + unit * L;
        float *k0 = xs + ((b * 4 + 0) * D + d) * L, *k1 = xs + ((b * 4 + 1) * D + d) * L;
        float *k2 = xs + ((b * 4 + 2) * D + d) * L, *k3 = xs + ((b * 4 + 3) * D + d) * L;
        memcpy(k0, src, sizeof(float) * (size_t)L);
        transpose_plane(src, k1, H, W);
        for (i64 t = 0; t < L; t++) { k2[t] = src[L - 1 - t]; k3[t] = k1[L - 1 - t]; }
    }
    return 0;
}

int cmdb_cross_fold(i64 lo, i64 hi, i64 D, i64 H, i64 W, const float *ys, float *y) {
    const i64 L = H * W;
    float *cols = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1));
    if (!cols) return -1;
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit / D, d = unit % D;
        const float *k0 = ys + ((b * 4 + 0) * D + d) * L, *k1 = ys + ((b * 4 + 1) * D + d) * L;
        const float *k2 = ys + ((b * 4 + 2) * D + d) * L, *k3 = ys + ((b * 4 + 3) * D + d) * L;
        float *dst = y + unit * L;
        for (i64 t = 0; t < L; t++) cols[t] = k1[t] + k3[L - 1 - t];  /* column-major order */
        transpose_plane(cols, dst, W, H);
        for (i64 t = 0; t < L; t++) dst[t] += k0[t] + k2[L - 1 - t];
    }
    free(cols);
    return 0;
}
