/* Compiled row encoder for the quantized classes (bits 1, 2, 4, 8): the same arithmetic as
 * compression/codecs.py (quantize_rows + encode_rows), bit for bit.
 *
 * Output row layout (compression/layout.py), row_bytes = 4 + stride:
 *
 *   bytes 0..1   f16 scale, little-endian
 *   bytes 2..3   f16 bias
 *   bytes 4..    codes, planar: stride = ceil(dim / (8 / bits)); code j sits in byte 4 + j % stride
 *                at bit offset (j / stride) * bits; x[j] ~ bias + scale * code[j]
 *
 * Bit-exactness with the torch encoder rests on three things:
 *   - every float operation is the same IEEE single operation in the same order.  Row sums use
 *     codecs._row_sum's fixed order (pad with +0.0 to a power of two, fold halves), never a
 *     compiler- or CPU-chosen one;
 *   - no contraction of a*b+c into an FMA (the pragma below: setup.py compiles the library with
 *     -ffp-contract=fast for the decoder) and no -ffast-math;
 *   - fp16 rounding is the IEEE conversion (round to nearest even, subnormals, overflow to inf),
 *     which GCC's _Float16 conversion is.
 * Rounding to an integer uses the 1.5 * 2^23 trick: exact round-half-even for |r| < 2^22, and
 * beyond that the result is still past the clamp range on the same side, so the clamped code is
 * the one torch.round().clamp() gives (the sign of a zero code can differ; it changes no output).
 *
 * Rows the torch path would carry through non-finite arithmetic (NaN or Inf input, or a min/max
 * scale or bias that overflows fp16) are not encoded here: the function reports them and the
 * caller encodes the whole batch with torch, so its result is torch's by construction.
 *
 * Rows are independent: the torch encoder's block-level "stop refitting when no row improved"
 * is per-row here, which gives the same result (a row that did not improve recomputes the same
 * candidate in every later round).
 */
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */

static inline float f16_round(float v) { return (float)(_Float16)v; }

static inline uint16_t f16_bits(float v) {
    _Float16 h = (_Float16)v;
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}

/* torch.round(r).clamp(0, qmax) */
static inline float round_clamp(float r, float qmax) {
    float q = (r + ROUND_MAGIC) - ROUND_MAGIC;
    return q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
}

/* codecs._row_sum: t[d..p) := +0.0, then t[j] = t[j] + t[j + h] for h = p/2 .. 1.  Destroys t. */
static float row_sum(float *restrict t, int d, int p) {
    for (int j = d; j < p; j++) t[j] = 0.0f;
    for (int h = p >> 1; h >= 1; h >>= 1)
        for (int j = 0; j < h; j++) t[j] = t[j] + t[j + h];
    return t[0];
}

typedef struct {
    int d, p;
    float qmax;
    float *tmp;  /* p floats: scratch for row_sum */
} ctx_t;

/* codecs._quantize_with: codes and the row's squared error under (scale, bias). */
static float quantize_with(const ctx_t *c, const float *x, float scale, float bias, float *codes) {
    const int d = c->d;
    const int positive = scale > 0.0f;
    const float safe = positive ? scale : 1.0f;
    for (int j = 0; j < d; j++) codes[j] = round_clamp((x[j] - bias) / safe, c->qmax);
    if (!positive)
        for (int j = 0; j < d; j++) codes[j] = codes[j] * 0.0f;
    for (int j = 0; j < d; j++) {
        float e = codes[j] * scale + (bias - x[j]);
        c->tmp[j] = e * e;
    }
    return row_sum(c->tmp, d, c->p);
}

/* codecs._clip_error */
static float clip_error(const ctx_t *c, const float *x, float scale, float bias) {
    const int d = c->d;
    const int positive = scale > 0.0f;
    const float safe = positive ? scale : 1.0f;
    for (int j = 0; j < d; j++) {
        float r = (x[j] - bias) / safe;
        float e = r - round_clamp(r, c->qmax);
        c->tmp[j] = e * e;
    }
    float err = row_sum(c->tmp, d, c->p) * (safe * safe);
    if (positive) return err;
    for (int j = 0; j < d; j++) {
        float e = x[j] - bias;
        c->tmp[j] = e * e;
    }
    return row_sum(c->tmp, d, c->p);
}

/* codecs._refit on one row: least-squares (scale, bias) on the current codes, kept while the
 * squared error goes down.  codes/scale/bias/err are updated in place. */
static void refit(const ctx_t *c, const float *x, const float *xc, float mean, float *codes, float *scale, float *bias,
                  float *err, int rounds, float *qc, float *new_codes) {
    const int d = c->d;
    if (d <= 1) return;
    for (int round = 0; round < rounds; round++) {
        memcpy(c->tmp, codes, (size_t)d * sizeof(float));
        const float q_mean = row_sum(c->tmp, d, c->p) / (float)d;
        for (int j = 0; j < d; j++) qc[j] = codes[j] - q_mean;
        for (int j = 0; j < d; j++) c->tmp[j] = qc[j] * qc[j];
        const float var_q = row_sum(c->tmp, d, c->p);
        for (int j = 0; j < d; j++) c->tmp[j] = qc[j] * xc[j];
        const float cov = row_sum(c->tmp, d, c->p);
        float ns = var_q > 0.0f ? cov / var_q : *scale;
        ns = f16_round(ns > 0.0f ? ns : 0.0f);
        const float nb = f16_round(mean - ns * q_mean);
        const float ne = quantize_with(c, x, ns, nb, new_codes);
        if (!(isfinite(ne) && ne < *err)) return; /* converged (or worse): later rounds repeat this */
        *scale = ns;
        *bias = nb;
        *err = ne;
        memcpy(codes, new_codes, (size_t)d * sizeof(float));
    }
}

static void pack(const float *codes, int d, int bits, uint8_t *out, int64_t stride) {
    if (bits == 8) {
        for (int j = 0; j < d; j++) out[j] = (uint8_t)codes[j];
        return;
    }
    memset(out, 0, (size_t)stride);
    for (int j = 0; j < d; j++) out[j % stride] |= (uint8_t)((int)codes[j] << ((j / stride) * bits));
}

/* Encode one row; returns 0, or 1 when the torch path must encode it (see the header).  Compiled
 * twice, for x86-64-v3 (AVX2, F16C) and baseline, picked at load time: the same IEEE operations
 * either way (FMA contraction is off for this file), only wider. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#endif
static int encode_row(const ctx_t *c, const float *x, int bits, int do_refit, const float *grid, int n_grid, uint8_t *out,
                      int64_t stride, float *buf) {
    const int d = c->d;
    float *codes = buf, *c_codes = buf + d, *xc = buf + 2 * d, *qc = buf + 3 * d, *scratch = buf + 4 * d;
    float lo = x[0], hi = x[0];
    for (int j = 0; j < d; j++) {
        if (!isfinite(x[j])) return 1;
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    lo = lo + 0.0f; /* -0.0 -> +0.0, as the torch path does */
    hi = hi + 0.0f;
    float bias = f16_round(lo);
    float scale = f16_round((hi - bias) / c->qmax);
    if (!isfinite(bias) || !isfinite(scale)) return 1;
    float err = quantize_with(c, x, scale, bias, codes);
    if (do_refit) {
        memcpy(c->tmp, x, (size_t)d * sizeof(float));
        const float mean = row_sum(c->tmp, d, c->p) / (float)d;
        for (int j = 0; j < d; j++) xc[j] = x[j] - mean;
        refit(c, x, xc, mean, codes, &scale, &bias, &err, 3, qc, scratch);
        if (n_grid > 0 && d > 1) {
            float best_err = 0.0f, best_s = 0.0f, best_b = 0.0f;
            for (int g = 0; g < n_grid; g++) {
                const float t = grid[g];
                const float b = f16_round(mean + t * (lo - mean));
                const float s = f16_round((mean + t * (hi - mean) - b) / c->qmax);
                if (n_grid == 1) { /* a single candidate wins unscored */
                    best_s = s, best_b = b;
                    break;
                }
                const float e = clip_error(c, x, s, b);
                if (g == 0 || e < best_err) best_err = e, best_s = s, best_b = b;
            }
            float c_scale = best_s, c_bias = best_b;
            float c_err = quantize_with(c, x, c_scale, c_bias, c_codes);
            refit(c, x, xc, mean, c_codes, &c_scale, &c_bias, &c_err, 2, qc, scratch);
            if (isfinite(c_err) && c_err < err) {
                scale = c_scale, bias = c_bias;
                memcpy(codes, c_codes, (size_t)d * sizeof(float));
            }
        }
    }
    uint16_t sb = f16_bits(scale), bb = f16_bits(bias);
    memcpy(out, &sb, 2);
    memcpy(out + 2, &bb, 2);
    pack(codes, d, bits, out + 4, stride);
    return 0;
}

/* Encode n float32 rows [n, dim] (contiguous) into out [n, row_bytes].  grid: the clipping
 * fractions of codecs._CLIP_GRID[bits] (n_grid = 0: no clip search).  Returns the number of rows
 * left for the torch path (0: all encoded), or -1 for bad arguments. */
int64_t embserve_encode_rows(const float *x, int64_t n, int32_t dim, int32_t bits, int32_t do_refit, const float *grid,
                             int32_t n_grid, uint8_t *out, int64_t row_bytes, int32_t threads) {
    if (dim <= 0 || !(bits == 1 || bits == 2 || bits == 4 || bits == 8) || n < 0 || n_grid < 0) return -1;
    const int per = 8 / bits;
    const int64_t stride = (dim + per - 1) / per;
    if (row_bytes != 4 + stride) return -1;
    int p = 1;
    while (p < dim) p <<= 1;
    if (threads < 1) threads = 1;
    if (threads > n) threads = n > 0 ? (int32_t)n : 1;
    const size_t per_thread = (size_t)5 * dim + p; /* codes, clip codes, xc, qc, new codes; row_sum scratch */
    float *bufs = malloc((size_t)threads * per_thread * sizeof(float));
    if (bufs == NULL) return -1;
    int64_t refused = 0;
#pragma omp parallel num_threads(threads) reduction(+ : refused) if (threads > 1)
    {
        int k = 0;
#ifdef _OPENMP
        k = omp_get_thread_num();
#endif
        float *buf = bufs + (size_t)k * per_thread;
        ctx_t c = {dim, p, (float)((1 << bits) - 1), buf + 5 * dim};
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++)
            refused += encode_row(&c, x + i * dim, bits, do_refit, grid, n_grid, out + i * row_bytes, stride, buf);
    }
    free(bufs);
    return refused;
}
