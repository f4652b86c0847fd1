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

#include "parallel.h"

typedef int64_t i64;

int cmdb_threads = 1;

void cmdb_set_threads(int n) { cmdb_threads = n > 0 ? n : 1; }

/* 1 when built with OpenMP: the entry points then split their units themselves. */
int cmdb_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

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

static int cmdb_scan_fwd_range(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
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
static int cmdb_scan_bwd_range(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
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

/* SS2D's four-way scan on a channels-last map, position-major. The four scan orders (row-major,
 * column-major, both reversed) are only orders in which the positions of one (L, D) plane are
 * visited, so nothing is expanded into four copies and nothing is merged afterwards: each order
 * adds its outputs into y at the positions it visits. The channels of a position are contiguous,
 * so the recurrence runs over a block of XB channels at once: vector lanes, independent chains.
 *
 * Layouts (contiguous): u, y, gy, gu (B, L, D); delta, gdelta (K, B, L, D); A (K, D, N); Bm, Cm
 * (B, L, K, N); Dv, bias (K, D). Kept for backward, in the order the steps run (so written and
 * read back as streams whatever the scan order): dt (K, B, blocks, L, XB) and states (K, B,
 * blocks, L, N, XB). Per-unit results: gA (B, K, D, N), gbias (B, K, D), gD (B, D) (the skip's
 * gradient, the same for every order), gB and gC (blocks, B, L, K, N), each block's sum over its
 * channels. A unit is a (batch, channel block) pair and owns its channels of y and gu, its rows
 * of every per-unit result and its streams of the kept tensors. */
#define XB 32   /* channels per unit: two AVX-512 vectors, a full cache line of each operand */
#define XK 4
#define XPF 16  /* steps ahead to prefetch: the column orders jump a row of the plane per step */
#define XFLUSH 64  /* steps summed in float before a sum joins its double total */

typedef struct { i64 B, D, H, W, N, blocks; int softplus; } XShape;

/* XB, for the Python side's buffer shapes. */
int cmdb_xscan_lanes(void) { return XB; }

/* pos[k * L + t]: the position that order k visits at step t. */
static int32_t *visit_orders(i64 H, i64 W) {
    const i64 L = H * W;
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * (size_t)(XK * (L > 0 ? L : 1)));
    if (!pos) return NULL;
    i64 t = 0;
    for (i64 w = 0; w < W; w++)
        for (i64 h = 0; h < H; h++, t++) pos[L + t] = (int32_t)(h * W + w);
    for (t = 0; t < L; t++) {
        pos[t] = (int32_t)t;
        pos[2 * L + t] = (int32_t)(L - 1 - t);
        pos[3 * L + t] = pos[L + L - 1 - t];
    }
    return pos;
}

static inline float hsum(const float *v) {  /* a fixed tree, so it vectorises without reassociation */
    float a[XB / 2];
    for (int j = 0; j < XB / 2; j++) a[j] = v[j] + v[j + XB / 2];
    for (int w = XB / 4; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) a[j] += a[j + w];
    return a[0];
}

/* nb <= XB channels into a full block, zeros past nb (NULL src: all zeros). */
static inline void load_block(float *dst, const float *src, i64 nb) {
    if (src && nb == XB) { memcpy(dst, src, sizeof(float) * XB); return; }
    for (int j = 0; j < XB; j++) dst[j] = (src && j < nb) ? src[j] : 0.f;
}

static inline void store_block(float *dst, const float *src, i64 nb) {
    memcpy(dst, src, sizeof(float) * (size_t)(nb < XB ? nb : XB));
}

/* Order k of one unit's channels [d0, d0 + nb) of batch b: h_t = exp(dt_t a) h_{t-1} + dt_t B_t u_t
 * and y += C_t h_t (y NULL: states only). Writes each step's dt and states to kdt (L, XB) and kh
 * (L, N, XB) when they are given; av holds the unit's A (N, XB), hn the running states (N, XB). */
static void xscan_order(const XShape *s, i64 b, i64 d0, i64 nb, int k, const int32_t *pos,
                        const float *u, const float *delta, const float *av, const float *Bm, const float *Cm,
                        const float *bias, float *y, float *kdt, float *kh, float *hn) {
    const i64 D = s->D, L = s->H * s->W, N = s->N;
    const float *dk = delta + (k * s->B + b) * L * D + d0, *ub = u + b * L * D + d0;
    float *yb = y ? y + b * L * D + d0 : NULL;
    float bs[XB], uu[XB], dt[XB], acc[XB];
    load_block(bs, bias ? bias + k * D + d0 : NULL, nb);
    for (i64 i = 0; i < N * XB; i++) hn[i] = 0.f;
    for (i64 t = 0; t < L; t++) {
        const i64 p = pos[t];
        if (t + XPF < L) {
            const i64 q = pos[t + XPF];
            __builtin_prefetch(dk + q * D);
            __builtin_prefetch(ub + q * D);
            if (yb) __builtin_prefetch(yb + q * D, 1);
        }
        load_block(dt, dk + p * D, nb);
        load_block(uu, ub + p * D, nb);
        if (s->softplus) for (int j = 0; j < XB; j++) dt[j] = softplus_f(dt[j] + bs[j]);
        else for (int j = 0; j < XB; j++) dt[j] += bs[j];
        if (kdt) memcpy(kdt + t * XB, dt, sizeof(float) * XB);
        const float *bp = Bm + ((b * L + p) * XK + k) * N, *cp = Cm + ((b * L + p) * XK + k) * N;
        for (int j = 0; j < XB; j++) acc[j] = 0.f;
        for (i64 n = 0; n < N; n++) {
            float *h = hn + n * XB;
            const float *a = av + n * XB, bn = bp[n], cn = cp[n];
            for (int j = 0; j < XB; j++) {
                h[j] = exp_f(dt[j] * a[j]) * h[j] + dt[j] * bn * uu[j];
                acc[j] += cn * h[j];
            }
            if (kh) memcpy(kh + (t * N + n) * XB, h, sizeof(float) * XB);
        }
        if (yb) for (i64 j = 0; j < nb; j++) yb[p * D + j] += acc[j];
    }
}

/* A of order k for the unit's channels, as (N, XB) lanes. */
static void load_a(float *av, const float *A, i64 k, i64 D, i64 N, i64 d0, i64 nb) {
    for (i64 n = 0; n < N; n++)
        for (int j = 0; j < XB; j++) av[n * XB + j] = j < nb ? A[(k * D + d0 + j) * N + n] : 0.f;
}

/* The unit's summed skip weights over the four orders. */
static void skip_sum(float *dsum, const float *Dv, i64 D, i64 d0, i64 nb) {
    for (int j = 0; j < XB; j++) dsum[j] = 0.f;
    if (Dv) for (int k = 0; k < XK; k++) for (i64 j = 0; j < nb; j++) dsum[j] += Dv[k * D + d0 + j];
}

/* Where order k's kept stream of unit (b, blk) starts, in elements of one (L, XB) row set. */
static i64 stream(const XShape *s, i64 k, i64 b, i64 blk) { return ((k * s->B + b) * s->blocks + blk) * s->H * s->W * XB; }

static int cmdb_xscan_fwd_range(i64 lo, i64 hi, i64 B, i64 D, i64 H, i64 W, i64 N, int softplus,
                   const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                   const float *Dv, const float *bias, float *y, float *keep_dt, float *keep_h) {
    const XShape s = {B, D, H, W, N, (D + XB - 1) / XB, softplus};
    const i64 L = H * W;
    int32_t *pos = visit_orders(H, W);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * N * XB));
    if (!pos || !scratch) { free(pos); free(scratch); return -1; }
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit % B, blk = unit / B, d0 = blk * XB, nb = D - d0 < XB ? D - d0 : XB;
        float dsum[XB];
        skip_sum(dsum, Dv, D, d0, nb);
        for (i64 p = 0; p < L; p++) {
            const float *uu = u + (b * L + p) * D + d0;
            float *yy = y + (b * L + p) * D + d0;
            for (i64 j = 0; j < nb; j++) yy[j] = dsum[j] * uu[j];
        }
        for (int k = 0; k < XK; k++) {
            load_a(scratch, A, k, D, N, d0, nb);
            const i64 at = stream(&s, k, b, blk);
            xscan_order(&s, b, d0, nb, k, pos + k * L, u, delta, scratch, Bm, Cm, bias, y,
                        keep_dt ? keep_dt + at : NULL, keep_h ? keep_h + at * N : NULL, scratch + N * XB);
        }
    }
    free(pos);
    free(scratch);
    return 0;
}

/* One step of one n in reverse time, over the lanes: sv the states' gradient dL/dh_t (through
 * h_{t+1} and y_t), dv the decay of the step after, hp the state before (zeros at t = 0). */
static inline void bwd_step(float *restrict sv, float *restrict dv, float *restrict fa, float *restrict gdt,
                            float *restrict gus, float *restrict tb, float *restrict tc, const float *restrict a,
                            const float *restrict dt, const float *restrict hp, const float *restrict ht,
                            const float *restrict g, const float *restrict uu, float bn, float cn) {
    for (int j = 0; j < XB; j++) {
        sv[j] = sv[j] * dv[j] + g[j] * cn;
        const float da = exp_f(dt[j] * a[j]), gda = sv[j] * hp[j] * da;  /* gda: dL/d(dt_t a) */
        gdt[j] += sv[j] * bn * uu[j] + gda * a[j];
        fa[j] += gda * dt[j];
        gus[j] += sv[j] * dt[j] * bn;
        tb[j] = sv[j] * dt[j] * uu[j];
        tc[j] = g[j] * ht[j];
        dv[j] = da;
    }
}

static int cmdb_xscan_bwd_range(i64 lo, i64 hi, i64 B, i64 D, i64 H, i64 W, i64 N, int softplus,
                   const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                   const float *Dv, const float *bias, const float *gy, const float *keep_dt, const float *keep_h,
                   float *gu, float *gdelta, float *gA, float *gB, float *gC, float *gD, float *gbias) {
    const XShape s = {B, D, H, W, N, (D + XB - 1) / XB, softplus};
    const i64 L = H * W;
    int32_t *pos = visit_orders(H, W);
    /* av, hn, the states' gradients sn, the next step's decays dn, float partial sums of gA (N, XB
     * each); dt (L, XB) and states (L, N, XB) recomputed when forward did not keep them. */
    const size_t per = (size_t)(5 * N * XB) + (keep_dt ? 0 : (size_t)(L * XB * (1 + N)));
    float *scratch = (float *)malloc(sizeof(float) * per), *av = scratch, *hn = av + N * XB;
    float *sn = hn + N * XB, *dn = sn + N * XB, *fa = dn + N * XB, *sdt = fa + N * XB, *sh = sdt + L * XB;
    double *accA = (double *)malloc(sizeof(double) * (size_t)(N * XB));
    if (!pos || !scratch || !accA) { free(pos); free(scratch); free(accA); return -1; }
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 b = unit % B, blk = unit / B, d0 = blk * XB, nb = D - d0 < XB ? D - d0 : XB;
        const float *ub = u + b * L * D + d0, *gyb = gy + b * L * D + d0;
        float *gub = gu + b * L * D + d0;
        float dsum[XB], uu[XB], g[XB], pre[XB], bs[XB], gdt[XB], gus[XB], tb[XB], tc[XB], fD[XB], fbias[XB];
        static const float zeros[XB];
        double accD[XB], accbias[XB];
        skip_sum(dsum, Dv, D, d0, nb);
        for (int j = 0; j < XB; j++) { accD[j] = 0.0; fD[j] = 0.f; }
        for (i64 p = 0; p < L; p++) {
            load_block(uu, ub + p * D, nb);
            load_block(g, gyb + p * D, nb);
            for (i64 j = 0; j < nb; j++) gub[p * D + j] = dsum[j] * g[j];
            for (int j = 0; j < XB; j++) fD[j] += g[j] * uu[j];
            if ((p + 1) % XFLUSH == 0 || p == L - 1)
                for (int j = 0; j < XB; j++) { accD[j] += fD[j]; fD[j] = 0.f; }
        }
        for (int k = 0; k < XK; k++) {
            const int32_t *order = pos + k * L;
            const float *dk = delta + (k * B + b) * L * D + d0;
            float *gdk = gdelta + (k * B + b) * L * D + d0;
            load_a(av, A, k, D, N, d0, nb);
            load_block(bs, bias ? bias + k * D + d0 : NULL, nb);
            const float *kdt = sdt, *kh = sh;
            if (keep_dt) kdt = keep_dt + stream(&s, k, b, blk), kh = keep_h + stream(&s, k, b, blk) * N;
            else xscan_order(&s, b, d0, nb, k, order, u, delta, av, Bm, Cm, bias, NULL, sdt, sh, hn);
            for (i64 i = 0; i < N * XB; i++) { sn[i] = 0.f; dn[i] = 0.f; fa[i] = 0.f; accA[i] = 0.0; }
            for (int j = 0; j < XB; j++) { accbias[j] = 0.0; fbias[j] = 0.f; }
            for (i64 t = L - 1; t >= 0; t--) {
                const i64 p = order[t];
                if (t >= XPF) {
                    const i64 q = order[t - XPF];
                    __builtin_prefetch(ub + q * D);
                    __builtin_prefetch(gyb + q * D);
                    __builtin_prefetch(dk + q * D);
                    __builtin_prefetch(gub + q * D, 1);
                    __builtin_prefetch(gdk + q * D, 1);
                }
                load_block(uu, ub + p * D, nb);
                load_block(g, gyb + p * D, nb);
                const float *dt = kdt + t * XB;
                const float *bp = Bm + ((b * L + p) * XK + k) * N, *cp = Cm + ((b * L + p) * XK + k) * N;
                float *gbp = gB + (((blk * B + b) * L + p) * XK + k) * N, *gcp = gC + (((blk * B + b) * L + p) * XK + k) * N;
                for (int j = 0; j < XB; j++) { gdt[j] = 0.f; gus[j] = 0.f; }
                for (i64 n = 0; n < N; n++) {
                    bwd_step(sn + n * XB, dn + n * XB, fa + n * XB, gdt, gus, tb, tc, av + n * XB, dt,
                             t ? kh + ((t - 1) * N + n) * XB : zeros, kh + (t * N + n) * XB, g, uu, bp[n], cp[n]);
                    gbp[n] = hsum(tb);
                    gcp[n] = hsum(tc);
                }
                if (s.softplus) {
                    load_block(pre, dk + p * D, nb);
                    for (int j = 0; j < XB; j++) gdt[j] *= sigmoid_f(pre[j] + bs[j]);
                }
                for (int j = 0; j < XB; j++) fbias[j] += gdt[j];
                for (i64 j = 0; j < nb; j++) gub[p * D + j] += gus[j];
                store_block(gdk + p * D, gdt, nb);
                if (t % XFLUSH == 0) {
                    for (int j = 0; j < XB; j++) { accbias[j] += fbias[j]; fbias[j] = 0.f; }
                    for (i64 i = 0; i < N * XB; i++) { accA[i] += fa[i]; fa[i] = 0.f; }
                }
            }
            for (i64 n = 0; n < N; n++)
                for (i64 j = 0; j < nb; j++) gA[((b * XK + k) * D + d0 + j) * N + n] = (float)accA[n * XB + j];
            for (i64 j = 0; j < nb; j++) gbias[(b * XK + k) * D + d0 + j] = (float)accbias[j];
        }
        for (i64 j = 0; j < nb; j++) gD[b * D + d0 + j] = (float)accD[j];
    }
    free(pos);
    free(scratch);
    free(accA);
    return 0;
}

/* The entry points: the ranges above, split over the threads (parallel.h). */

int cmdb_scan_fwd(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
                  const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                  const float *Dv, const float *z, const float *bias, int softplus,
                  float *out, float *last, float *keep_dt, float *keep_h) {
    CMDB_SLICED(lo, hi, cmdb_scan_fwd_range(a_, b_, D, L, N, G, u, delta, A, Bm, Cm, Dv, z, bias, softplus, out, last, keep_dt, keep_h));
}

int cmdb_scan_bwd(i64 lo, i64 hi, i64 D, i64 L, i64 N, i64 G,
                  const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                  const float *Dv, const float *z, const float *bias, int softplus,
                  const float *gout, const float *glast,
                  float *gu, float *gdelta, float *gA, float *gB, float *gC, float *gD, float *gz,
                  float *gbias, const float *kept_dt, const float *kept_h) {
    CMDB_SLICED(lo, hi, cmdb_scan_bwd_range(a_, b_, D, L, N, G, u, delta, A, Bm, Cm, Dv, z, bias, softplus, gout, glast, gu, gdelta, gA, gB, gC, gD, gz, gbias, kept_dt, kept_h));
}

int cmdb_xscan_fwd(i64 lo, i64 hi, i64 B, i64 D, i64 H, i64 W, i64 N, int softplus,
                   const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                   const float *Dv, const float *bias, float *y, float *keep_dt, float *keep_h) {
    CMDB_SLICED(lo, hi, cmdb_xscan_fwd_range(a_, b_, B, D, H, W, N, softplus, u, delta, A, Bm, Cm, Dv, bias, y, keep_dt, keep_h));
}

int cmdb_xscan_bwd(i64 lo, i64 hi, i64 B, i64 D, i64 H, i64 W, i64 N, int softplus,
                   const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                   const float *Dv, const float *bias, const float *gy, const float *keep_dt, const float *keep_h,
                   float *gu, float *gdelta, float *gA, float *gB, float *gC, float *gD, float *gbias) {
    CMDB_SLICED(lo, hi, cmdb_xscan_bwd_range(a_, b_, B, D, H, W, N, softplus, u, delta, A, Bm, Cm, Dv, bias, gy, keep_dt, keep_h, gu, gdelta, gA, gB, gC, gD, gbias));
}
