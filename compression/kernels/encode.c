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
 *
 * Layout of the work: groups of LANES rows, transposed so that value j of the group's rows sits
 * in g[j * LANES .. j * LANES + LANES).  Every loop is "for each coordinate, for each lane",
 * the lane loop being one vector instruction; a row sum folds whole lane vectors, so even its
 * last levels are vector adds, and the per-row decisions (refit taken or not, best clip) are
 * lane masks.  One row at a time, the same arithmetic ran at ~0.8M rows/s: it waited on the
 * latency of each sum's last levels and each division.  A short last group is padded with
 * copies of its last row, which are computed and dropped.
 */
#pragma GCC optimize("fp-contract=off")
/* the lane vectors below are passed only between always_inline functions: no ABI involved */
#pragma GCC diagnostic ignored "-Wpsabi"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */

static inline __attribute__((always_inline)) float f16_round(float v) { return (float)(_Float16)v; }

static inline __attribute__((always_inline)) uint16_t f16_bits(float v) {
    _Float16 h = (_Float16)v;
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}

/* torch.round(r).clamp(0, qmax) */
static inline __attribute__((always_inline)) float round_clamp(float r, float qmax) {
    float q = (r + ROUND_MAGIC) - ROUND_MAGIC;
    return q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
}

#define LANES 8
#define FOR_L for (int l = 0; l < LANES; l++)

/* LANES floats / int32 masks: GCC vector extensions, element-wise IEEE operations (two SSE
 * registers in the baseline build, one AVX register in the x86-64-v3 one) */
typedef float v8f __attribute__((vector_size(4 * LANES), aligned(4 * LANES)));
typedef int32_t v8i __attribute__((vector_size(4 * LANES), aligned(4 * LANES)));

static inline __attribute__((always_inline)) v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline __attribute__((always_inline)) v8f vsplat(float v) { return (v8f){v, v, v, v, v, v, v, v}; }
static inline __attribute__((always_inline)) v8f vload(const float *a) {
    v8f v;
    memcpy(&v, a, sizeof v);
    return v;
}

/* torch.round(r).clamp(0, qmax) on a lane vector */
static inline __attribute__((always_inline)) v8f vround_clamp(v8f r, v8f qmax) {
    const v8f magic = vsplat(ROUND_MAGIC), zero = vsplat(0.0f);
    v8f q = (r + magic) - magic;
    q = vsel(q < zero, zero, q);
    return vsel(q > qmax, qmax, q);
}

typedef struct {
    int d, p;
    float qmax;
    v8f *tmp; /* p lane vectors: row_sum scratch */
} ctx_t;

/* codecs._row_sum for each lane: t[d..p) := +0.0, then t[j] = t[j] + t[j + h] for h = p/2 .. 1
 * (t[j]: coordinate j of the LANES rows).  Destroys t. */
static inline __attribute__((always_inline)) v8f row_sum(v8f *restrict t, int d, int p) {
    for (int j = d; j < p; j++) t[j] = vsplat(0.0f);
    for (int h = p >> 1; h >= 1; h >>= 1)
        for (int j = 0; j < h; j++) t[j] = t[j] + t[j + h];
    return t[0];
}

/* codecs._quantize_with: codes and each row's squared error under (scale, bias). */
static inline __attribute__((always_inline)) v8f quantize_with(const ctx_t *c, const v8f *restrict x, v8f scale, v8f bias,
                                                               v8f *restrict codes) {
    const int d = c->d;
    const v8f zero = vsplat(0.0f), qmax = vsplat(c->qmax);
    const v8i positive = scale > zero;
    const v8f safe = vsel(positive, scale, vsplat(1.0f));
    for (int j = 0; j < d; j++) codes[j] = vround_clamp((x[j] - bias) / safe, qmax);
    int all_positive = 1;
    FOR_L all_positive &= positive[l] != 0;
    if (!all_positive) { /* codes.mul_(positive) */
        const v8f keep = vsel(positive, vsplat(1.0f), zero);
        for (int j = 0; j < d; j++) codes[j] = codes[j] * keep;
    }
    for (int j = 0; j < d; j++) {
        const v8f e = codes[j] * scale + (bias - x[j]);
        c->tmp[j] = e * e;
    }
    return row_sum(c->tmp, d, c->p);
}

/* codecs._clip_error */
static inline __attribute__((always_inline)) v8f clip_error(const ctx_t *c, const v8f *restrict x, v8f scale, v8f bias) {
    const int d = c->d;
    const v8f zero = vsplat(0.0f), qmax = vsplat(c->qmax);
    const v8i positive = scale > zero;
    const v8f safe = vsel(positive, scale, vsplat(1.0f));
    for (int j = 0; j < d; j++) {
        const v8f r = (x[j] - bias) / safe;
        const v8f e = r - vround_clamp(r, qmax);
        c->tmp[j] = e * e;
    }
    const v8f err = row_sum(c->tmp, d, c->p) * (safe * safe);
    int all_positive = 1;
    FOR_L all_positive &= positive[l] != 0;
    if (all_positive) return err;
    for (int j = 0; j < d; j++) {
        const v8f e = x[j] - bias;
        c->tmp[j] = e * e;
    }
    return vsel(positive, err, row_sum(c->tmp, d, c->p));
}

static inline __attribute__((always_inline)) v8f f16_round_v(v8f v) {
    FOR_L v[l] = f16_round(v[l]);
    return v;
}

static inline __attribute__((always_inline)) v8i finite_v(v8f v) {
    const v8f a = vsel((v8i)v < (v8i)vsplat(0.0f), -v, v); /* |v| by sign: NaN stays NaN */
    return a <= vsplat(3.4028234663852886e38f);             /* false for NaN and Inf */
}

/* codecs._refit for each lane: least-squares (scale, bias) on the current codes, taken while the
 * row's squared error goes down; a row stops at its first round that does not improve it. */
static inline __attribute__((always_inline)) void refit(const ctx_t *c, const v8f *restrict x, const v8f *restrict xc, v8f mean,
                                                        v8f *restrict codes, v8f *scale, v8f *bias, v8f *err, int rounds,
                                                        v8f *restrict qc, v8f *restrict new_codes) {
    const int d = c->d;
    if (d <= 1) return;
    const v8f zero = vsplat(0.0f);
    v8i active = (v8i)vsplat(0.0f) == (v8i)vsplat(0.0f); /* all lanes */
    for (int round = 0; round < rounds; round++) {
        memcpy(c->tmp, codes, (size_t)d * sizeof(v8f));
        const v8f q_mean = row_sum(c->tmp, d, c->p) / vsplat((float)d);
        for (int j = 0; j < d; j++) qc[j] = codes[j] - q_mean;
        for (int j = 0; j < d; j++) c->tmp[j] = qc[j] * qc[j];
        const v8f var_q = row_sum(c->tmp, d, c->p);
        for (int j = 0; j < d; j++) c->tmp[j] = qc[j] * xc[j];
        const v8f cov = row_sum(c->tmp, d, c->p);
        const v8i has_var = var_q > zero;
        v8f ns = vsel(has_var, cov / vsel(has_var, var_q, vsplat(1.0f)), *scale);
        ns = f16_round_v(vsel(ns > zero, ns, zero));
        const v8f nb = f16_round_v(mean - ns * q_mean);
        const v8f ne = quantize_with(c, x, ns, nb, new_codes);
        active = active & finite_v(ne) & (ne < *err);
        int any = 0;
        FOR_L any |= active[l] != 0;
        if (!any) return;
        *scale = vsel(active, ns, *scale);
        *bias = vsel(active, nb, *bias);
        *err = vsel(active, ne, *err);
        for (int j = 0; j < d; j++) codes[j] = vsel(active, new_codes[j], codes[j]);
    }
}

static void pack(const float *codes, int lane, int d, int bits, uint8_t *out, int64_t stride) {
    if (bits == 8) {
        for (int j = 0; j < d; j++) out[j] = (uint8_t)codes[j * LANES + lane];
        return;
    }
    memset(out, 0, (size_t)stride);
    for (int j = 0; j < d; j++) out[j % stride] |= (uint8_t)((int)codes[j * LANES + lane] << ((j / stride) * bits));
}

/* Encode rows x[0 .. rows) (rows <= LANES; row r at x + r * d) into out + r * row_bytes.
 * Returns how many of them the torch path must encode (see the header).  Compiled twice, for
 * x86-64-v3 (AVX2, F16C) and baseline, picked at load time: the same IEEE operations either
 * way (FMA contraction is off for this file), only wider. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(EMBSERVE_NO_CLONES) /* -DEMBSERVE_NO_CLONES: baseline only (to test it) */
__attribute__((target_clones("arch=x86-64-v3", "default"), noinline))
#endif
static int encode_group(const ctx_t *c, const float *x, int rows, int bits, int do_refit, const float *grid, int n_grid,
                        uint8_t *out, int64_t row_bytes, int64_t stride, v8f *buf) {
    const int d = c->d;
    v8f *g = buf, *codes = buf + d, *c_codes = buf + 2 * d, *xc = buf + 3 * d, *qc = buf + 4 * d, *scratch = buf + 5 * d;
    for (int l = 0; l < LANES; l++) {
        const float *row = x + (size_t)(l < rows ? l : rows - 1) * d;
        for (int j = 0; j < d; j++) g[j][l] = row[j];
    }
    v8f lo = g[0], hi = g[0];
    v8i ok = finite_v(g[0]);
    for (int j = 0; j < d; j++) {
        ok = ok & finite_v(g[j]);
        lo = vsel(g[j] < lo, g[j], lo);
        hi = vsel(g[j] > hi, g[j], hi);
    }
    lo = lo + vsplat(0.0f); /* -0.0 -> +0.0, as the torch path does */
    hi = hi + vsplat(0.0f);
    v8f bias = f16_round_v(lo);
    v8f scale = f16_round_v((hi - bias) / vsplat(c->qmax));
    ok = ok & finite_v(bias) & finite_v(scale);
    int refused = 0;
    for (int l = 0; l < rows; l++) refused += ok[l] == 0;
    if (refused) return refused; /* the caller re-encodes the whole batch with torch */
    v8f err = quantize_with(c, g, scale, bias, codes);
    if (do_refit) {
        memcpy(c->tmp, g, (size_t)d * sizeof(v8f));
        const v8f mean = row_sum(c->tmp, d, c->p) / vsplat((float)d);
        for (int j = 0; j < d; j++) xc[j] = g[j] - mean;
        refit(c, g, xc, mean, codes, &scale, &bias, &err, 3, qc, scratch);
        if (n_grid > 0 && d > 1) {
            v8f best_err = vsplat(0.0f), best_s = vsplat(0.0f), best_b = vsplat(0.0f);
            for (int k = 0; k < n_grid; k++) {
                const v8f t = vsplat(grid[k]);
                const v8f b = f16_round_v(mean + t * (lo - mean));
                const v8f s = f16_round_v((mean + t * (hi - mean) - b) / vsplat(c->qmax));
                if (n_grid == 1) { /* a single candidate wins unscored */
                    best_s = s, best_b = b;
                    break;
                }
                const v8f e = clip_error(c, g, s, b);
                const v8i win = k == 0 ? (v8i)(e == e) | (v8i)(e != e) : (v8i)(e < best_err);
                best_err = vsel(win, e, best_err);
                best_s = vsel(win, s, best_s);
                best_b = vsel(win, b, best_b);
            }
            v8f c_err = quantize_with(c, g, best_s, best_b, c_codes);
            refit(c, g, xc, mean, c_codes, &best_s, &best_b, &c_err, 2, qc, scratch);
            const v8i take = finite_v(c_err) & (c_err < err);
            scale = vsel(take, best_s, scale);
            bias = vsel(take, best_b, bias);
            for (int j = 0; j < d; j++) codes[j] = vsel(take, c_codes[j], codes[j]);
        }
    }
    for (int l = 0; l < rows; l++) {
        uint8_t *o = out + (size_t)l * row_bytes;
        const uint16_t sb = f16_bits(scale[l]), bb = f16_bits(bias[l]);
        memcpy(o, &sb, 2);
        memcpy(o + 2, &bb, 2);
        pack((const float *)codes, l, d, bits, o + 4, stride);
    }
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
    const int64_t groups = (n + LANES - 1) / LANES;
    if (threads < 1) threads = 1;
    if (threads > groups) threads = groups > 0 ? (int32_t)groups : 1;
    /* per thread: the group, codes, clip codes, xc, qc, new codes (d x LANES each); row_sum scratch */
    const size_t per_thread = (size_t)6 * dim + p; /* lane vectors */
    v8f *bufs = aligned_alloc(sizeof(v8f), (size_t)threads * per_thread * sizeof(v8f));
    if (bufs == NULL) return -1;
    int64_t refused = 0;
#pragma omp parallel num_threads(threads) reduction(+ : refused) if (threads > 1)
    {
        int k = 0;
#ifdef _OPENMP
        k = omp_get_thread_num();
#endif
        v8f *buf = bufs + (size_t)k * per_thread;
        ctx_t c = {dim, p, (float)((1 << bits) - 1), buf + (size_t)6 * dim};
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < groups; gi++) {
            const int64_t i = gi * LANES;
            const int rows = (int)(n - i < LANES ? n - i : LANES);
            refused += encode_group(&c, x + i * dim, rows, bits, do_refit, grid, n_grid, out + i * row_bytes, row_bytes, stride, buf);
        }
    }
    free(bufs);
    return refused;
}
