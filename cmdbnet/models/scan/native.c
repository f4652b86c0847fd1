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
#include "vmath.h"

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
