/* SS2D's four scan orders on a channels-last plane (PlaneScan in native.py): forward and backward.
 * Built into one library with native.c; the layouts are described below. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vmath.h"

typedef int64_t i64;

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
