/* Depthwise 3 x 3 convolution (stride 1, zero padding 1) of NCHW fp32 planes: forward and both
 * gradients. Built into the same library as the CPU scan (cmdbnet/models/scan/native.py) and
 * called through ctypes by cmdbnet/models/depthwise.py.
 *
 * Why: oneDNN runs a depthwise convolution of a plain NCHW map through reorders to its blocked
 * layout and back, which on wide 1/4-scale maps costs several times the nine multiply-adds per
 * pixel; here each plane is read in place. Every input row is first copied once into a row with
 * a zero on either side, so all loops run the whole row with no edge cases and vectorise. Units
 * are (batch, channel) planes; a unit writes only its own plane (and its own row of the
 * per-plane weight and bias sums), so callers may run disjoint unit ranges in parallel threads.
 *
 * Layouts (contiguous): x, y, gy, gx (B, C, H, W); w (C, 3, 3); bias (C) or NULL;
 * per-plane sums gw (B, C, 3, 3) and gb (B, C) (the caller adds the batch rows up).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scan/parallel.h"

typedef int64_t i64;

#define LANES 16

/* Rows -1..H of a plane, padded: rows[r + 1] is row r with a zero on either side (W + 2 floats),
 * rows -1 and H are all zeros. One buffer of (H + 2) (W + 2) floats, filled per plane. */
static void pad_plane(const float *src, i64 H, i64 W, float *rows) {
    const i64 P = W + 2;
    memset(rows, 0, sizeof(float) * (size_t)P);
    memset(rows + (H + 1) * P, 0, sizeof(float) * (size_t)P);
    for (i64 i = 0; i < H; i++) {
        float *r = rows + (i + 1) * P;
        r[0] = 0.f;
        memcpy(r + 1, src + i * W, sizeof(float) * (size_t)W);
        r[W + 1] = 0.f;
    }
}

/* dst = conv(src, k) + init over one plane: k (3, 3) taps on the padded rows. */
static void conv_plane(const float *rows, i64 H, i64 W, const float *k, float init, float *dst) {
    const i64 P = W + 2;
    for (i64 i = 0; i < H; i++) {
        const float *r0 = rows + i * P, *r1 = r0 + P, *r2 = r1 + P;
        float *out = dst + i * W;
        for (i64 j = 0; j < W; j++)
            out[j] = init + k[0] * r0[j] + k[1] * r0[j + 1] + k[2] * r0[j + 2]
                          + k[3] * r1[j] + k[4] * r1[j + 1] + k[5] * r1[j + 2]
                          + k[6] * r2[j] + k[7] * r2[j + 1] + k[8] * r2[j + 2];
    }
}

/* y = depthwise(x, w) + bias; with ``flip`` the kernel turned by 180 degrees and no bias, which
 * is the gradient of x: gx = depthwise(gy, flipped w). */
static int planes(i64 lo, i64 hi, i64 C, i64 H, i64 W, const float *x, const float *w, const float *bias,
                  int flip, float *y) {
    float *rows = (float *)malloc(sizeof(float) * (size_t)((H + 2) * (W + 2)));
    if (!rows) return -1;
    for (i64 unit = lo; unit < hi; unit++) {
        const i64 c = unit % C;
        float k[9];
        for (int t = 0; t < 9; t++) k[t] = w[c * 9 + (flip ? 8 - t : t)];
        pad_plane(x + unit * H * W, H, W, rows);
        conv_plane(rows, H, W, k, bias && !flip ? bias[c] : 0.f, y + unit * H * W);
    }
    free(rows);
    return 0;
}

int cmdb_dw3x3_fwd(i64 lo, i64 hi, i64 C, i64 H, i64 W, const float *x, const float *w, const float *bias, float *y) {
    CMDB_SLICED(lo, hi, planes(a_, b_, C, H, W, x, w, bias, 0, y));
}

int cmdb_dw3x3_bwd_input(i64 lo, i64 hi, i64 C, i64 H, i64 W, const float *gy, const float *w, float *gx) {
    CMDB_SLICED(lo, hi, planes(a_, b_, C, H, W, gy, w, NULL, 1, gx));
}

/* acc (10, LANES) += the n <= LANES columns' products of gy with the nine taps, and gy itself. */
static inline void tap_lanes(float *restrict acc, const float *restrict g, const float *restrict r0,
                             const float *restrict r1, const float *restrict r2, i64 n) {
    for (int l = 0; l < LANES; l++) {
        const float v = l < n ? g[l] : 0.f;
        const float x00 = l < n ? r0[l] : 0.f, x01 = l < n ? r0[l + 1] : 0.f, x02 = l < n ? r0[l + 2] : 0.f;
        const float x10 = l < n ? r1[l] : 0.f, x11 = l < n ? r1[l + 1] : 0.f, x12 = l < n ? r1[l + 2] : 0.f;
        const float x20 = l < n ? r2[l] : 0.f, x21 = l < n ? r2[l + 1] : 0.f, x22 = l < n ? r2[l + 2] : 0.f;
        acc[l] += v * x00; acc[LANES + l] += v * x01; acc[2 * LANES + l] += v * x02;
        acc[3 * LANES + l] += v * x10; acc[4 * LANES + l] += v * x11; acc[5 * LANES + l] += v * x12;
        acc[6 * LANES + l] += v * x20; acc[7 * LANES + l] += v * x21; acc[8 * LANES + l] += v * x22;
        acc[9 * LANES + l] += v;
    }
}

/* gw[a][b] = sum over the plane of gy[i][j] x[i + a - 1][j + b - 1] (the padded row i + a at
 * column j + b); gb = sum of gy. Summed in float in LANES lanes per tap, the lanes in double. */
static int bwd_weight(i64 lo, i64 hi, i64 H, i64 W, const float *x, const float *gy, float *gw, float *gb) {
    const i64 P = W + 2;
    float *rows = (float *)malloc(sizeof(float) * (size_t)((H + 2) * P));
    if (!rows) return -1;
    for (i64 unit = lo; unit < hi; unit++) {
        const float *g = gy + unit * H * W;
        float acc[10 * LANES];
        memset(acc, 0, sizeof(acc));
        pad_plane(x + unit * H * W, H, W, rows);
        for (i64 i = 0; i < H; i++) {
            const float *gr = g + i * W, *r0 = rows + i * P, *r1 = r0 + P, *r2 = r1 + P;
            i64 j = 0;
            for (; j + LANES <= W; j += LANES) tap_lanes(acc, gr + j, r0 + j, r1 + j, r2 + j, LANES);
            if (j < W) tap_lanes(acc, gr + j, r0 + j, r1 + j, r2 + j, W - j);
        }
        for (int t = 0; t < 10; t++) {
            double sum = 0.0;
            for (int l = 0; l < LANES; l++) sum += acc[t * LANES + l];
            if (t < 9) gw[unit * 9 + t] = (float)sum;
            else if (gb) gb[unit] = (float)sum;
        }
    }
    free(rows);
    return 0;
}

int cmdb_dw3x3_bwd_weight(i64 lo, i64 hi, i64 H, i64 W, const float *x, const float *gy, float *gw, float *gb) {
    CMDB_SLICED(lo, hi, bwd_weight(a_, b_, H, W, x, gy, gw, gb));
}
