/* Compiled CPU gather-dequantize for compressed embedding tables.
 *
 * One pass over the requested IDs; each output row is written exactly once.  Row layout (see
 * compression/layout.py):
 *
 *   bits == 32   f32 x[0..dim)                                   row_bytes = 4 * dim
 *   bits == 16   f16 x[0..dim)                                   row_bytes = 2 * dim
 *   bits <= 8    f16 scale | f16 bias | codes (planar order)     row_bytes = 4 + stride
 *                stride = ceil(dim / (8 / bits)); code j sits in byte 4 + j % stride at
 *                bit offset (j / stride) * bits; x[j] = bias + scale * code[j]
 *
 *   pq (m > 0)   m codes of `bits` bits, one little-endian bit stream    row_bytes = ceil(m * bits / 8)
 *                (code j = bits j*bits.. of the row, bit b = bit b%8 of byte b/8); with
 *                s = dim / m: x[j*s .. j*s+s) = codebook[j][code j][0..s), fp16 [m, 2**bits, s]
 *
 * A locator is an int32: class in bits 28..30, slot in bits 0..27, -1 = no row (zeros).
 *
 * Work is split into chunks of consecutive IDs (OpenMP, one chunk per thread).  Each chunk is a
 * software pipeline per ID (run_ids): iteration i locates ID i + 2*AHEAD (prefetches its index
 * entry: the dense locator, or the hash slot; a static hash slot's position comes from a first
 * pass over the chunk, static_positions, that reads the pilots),
 * resolves ID i + AHEAD (reads that entry, by now
 * in cache, and prefetches the row) and decodes ID i, so each ID's two dependent random loads
 * are in flight for AHEAD decodes each and misses are issued at an even rate.  Keyed (sorted)
 * indexes keep a pipeline over blocks of BLOCK IDs (run_keyed): their fence search walks a
 * whole block one level at a time so its misses overlap.  Decoding: each class gets a row kind
 * once per call (row_kind), and the common ones - quantized rows as wide as the table - decode
 * inline in run_range with the bit width a constant (decode_q), so each clone of run_range
 * (below) vectorizes the planes for its own target, as do fp16/fp32 rows and the truncated
 * quantized classes of a rotated table (decode_rot); the rest (PQ, narrower classes of an
 * unrotated table, widths past 64) go through decode_other.  Sub-byte codes are decoded plane by plane: each plane is a
 * contiguous run of output floats (an interleaved order such as FBGEMM's low-nibble-even would
 * need strided stores).
 *
 * Why, measured (bench/results/lookup.md's 8x table: 1M x 64, batch 4096, one thread; ratios
 * are interleaved A/B medians with min..max):
 *   - The earlier pipeline worked in bursts over 32-ID blocks (32 locator prefetches, then 64
 *     row prefetches, then 32 decodes with no memory traffic).  perf put most of the time on
 *     the prefetch instructions themselves: a burst overflows the ~16 line fill buffers and
 *     stalls until misses return.  Per-ID: 1.19x (1.16..1.33) uniform IDs, 1.11x (0.98..1.35)
 *     Zipf.  AHEAD 4 / 8 / 16 / 24 / 32 / 48: 16 and up are level (within noise), 4 and 8 lose.
 *   - The per-row dispatch (decode_any -> decode_row -> dequant_planes_avx2, called per row with
 *     a runtime bit width and loop bounds) against row kinds with decode_q inlined: 1.60x
 *     (1.50..1.74) uniform, 1.22x (1.16..1.35) Zipf.  Against FBGEMM INT4 the 8x table went
 *     from 0.75x / 0.86x to 1.59x (1.48..1.76) / 1.46x (1.35..1.71).
 *   - Tried without gain: scale/bias through F16C instead of the 256 KiB f16_table (1.00x,
 *     then 1.03x against 1.02x for an identical copy: noise), prefetching index entries or
 *     rows into L2 only (prefetcht1/t2: within noise), huge pages for every tensor
 *     (THP_MEM_ALLOC_ENABLE=1, FBGEMM's too: no change beyond run-to-run noise; one process
 *     per setting, so not interleaved).
 *   What is left is memory: perf puts ~2/3 of run_range on the row prefetch waiting for a fill
 *   buffer.  A dense ID costs two dependent misses (4-byte locator, then the row) where FBGEMM's
 *   fixed-stride rows need one; given the locators (resolved IDs) the same decode is 1.26x
 *   (1.11..1.42) faster with uniform IDs, 1.17x (1.00..1.32) Zipf.
 *
 * Built by setuptools as an optional extension and called through ctypes; it uses no Python
 * API.  On x86-64 the hot function (run_range, with the pipeline and decode_q inlined) is
 * compiled twice (x86-64-v3: AVX2+FMA+F16C, and baseline) and the loader picks the one the CPU
 * supports; -DEMBSERVE_NO_CLONES builds the baseline alone (tests/test_decode_pipeline.py).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "hashslot.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_SIMD 1
#endif

#define CLASS_SHIFT 28
#define SLOT_MASK ((1 << CLASS_SHIFT) - 1)
#ifndef BLOCK
#define BLOCK 32
#endif
#define MAX_CLASSES 8

/* -DEMBSERVE_NO_CLONES: the baseline clone alone, run as on a CPU without AVX2 (use_avx2 stays
   0), so tests can hold that build to the torch reference on any x86-64 machine */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(EMBSERVE_NO_CLONES)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    const uint8_t *base; /* slab data, row-major [capacity, row_bytes] */
    int64_t row_bytes;
    int32_t dim;
    int32_t bits;
    const float *rotation_t; /* truncated class of a rotated table: fp32 R^T [K, width] (K >= dim), else NULL */
    int32_t pq_m;            /* > 0: product-quantization class of pq_m sub-vectors */
    int32_t pad;
    const uint16_t *codebook; /* pq: fp16 [pq_m, 2**bits, dim / pq_m] */
} row_class_t;

#define MAX_ROTATED_DIM 1024

static float f16_table[65536];
static int f16_ready = 0;
static int use_avx2 = 0;   /* set once by embserve_init from CPUID */
static int use_avx512 = 0; /* avx512f as well: the rotation's multiply-add (rotate_back_avx512) */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* A library whose row_class_t.rotation_t is fp32 (before, fp16): cpu_c.py does not use one
   without this name, which would read an fp32 R^T as halves. */
int embserve_rotation_f32(void) { return 1; }

void embserve_init(void) {
    if (f16_ready) return;
    for (uint32_t h = 0; h < 65536; h++) f16_table[h] = half_to_float((uint16_t)h);
#if defined(HAVE_X86_SIMD) && !defined(EMBSERVE_NO_CLONES)
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    use_avx512 = use_avx2 && __builtin_cpu_supports("avx512f");
#endif
    f16_ready = 1;
}

static inline float load_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_table[h];
}

#ifdef HAVE_X86_SIMD
/* AVX2 + FMA (+ F16C) decoders, picked at run time from CPUID. */
__attribute__((target("avx2,fma"))) static inline void dequant8_avx2(const uint8_t *codes, int d, float scale,
                                                                      float bias, float *o) {
    const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias);
    int j = 0;
    for (; j + 8 <= d; j += 8) {
        __m128i c = _mm_loadl_epi64((const __m128i *)(codes + j));
        __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(f, vs, vb));
    }
    for (; j < d; j++) o[j] = (float)codes[j] * scale + bias;
}

/* Sub-byte codes (4, 2 or 1 bits), planar: plane p is the run of `stride` output floats
   o[p*stride ..), read from the code bytes shifted right by p*bits.  8 bytes -> 8 floats per step. */
__attribute__((target("avx2,fma"))) static inline void dequant_planes_avx2(const uint8_t *codes, int d, int bits,
                                                                            float scale, float bias, float *o) {
    const int per = 8 / bits, stride = (d + per - 1) / per;
    const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias);
    const __m128i mask = _mm_set1_epi8((char)((1 << bits) - 1));
    const int vec_end = (stride * per == d) ? stride / 8 * 8 : 0;
    for (int p = 0; p < per; p++) {
        const __m128i shift = _mm_cvtsi32_si128(p * bits);
        float *op = o + p * stride;
        for (int k = 0; k < vec_end; k += 8) {
            __m128i c = _mm_loadl_epi64((const __m128i *)(codes + k));
            c = _mm_and_si128(_mm_srl_epi16(c, shift), mask);
            _mm256_storeu_ps(op + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), vs, vb));
        }
        const int count = d - p * stride < stride ? d - p * stride : stride;
        for (int k = vec_end; k < count; k++)
            op[k] = (float)((codes[k] >> (p * bits)) & ((1 << bits) - 1)) * scale + bias;
    }
}

__attribute__((target("avx2,f16c"))) static inline void half_to_float_f16c(const uint8_t *src, int d, float *o) {
    int j = 0;
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(o + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * j))));
    if (j + 4 <= d) { /* 4-coordinate PQ sub-vectors: one 128-bit conversion, not 4 table loads */
        _mm_storeu_ps(o + j, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(src + 2 * j))));
        j += 4;
    }
    for (; j < d; j++) o[j] = load_half(src + 2 * j);
}

/* Output columns j0.. of x = y R^T one at a time: the vector loops' tail past the last full 64
   (always inlined, so it compiles for its caller's target and rounds as before). */
static inline __attribute__((always_inline)) void rotate_back_columns(const float *y, int d, const float *rot_t, int64_t width,
                                                                      int64_t j0, float *o) {
    for (int64_t j = j0; j < width; j++) {
        float sum = 0.0f;
        for (int k = 0; k < d; k++) sum += y[k] * rot_t[(int64_t)k * width + j];
        o[j] = sum;
    }
}

/* x = sum_k y[k] * R^T[k, :] with the output held in registers, 64 floats (8 accumulators) at a
   time: each R^T row is streamed once per 64 outputs and no partial sum goes back to memory.
   R^T is fp32 (the decoder's copy, kernels/__init__.py): a row of a dims-16x table is 16 x 64
   multiply-adds, and widening an fp16 R^T on every load made that part 1.18x (1.13..1.24)
   slower with uniform IDs (interleaved A/B, bench/results/lookup.md's dims 16x table). */
__attribute__((target("avx2,fma,f16c"))) static inline void rotate_back_avx2(const float *y, int d, const float *rot_t,
                                                                             int64_t width, float *o) {
    int64_t j0 = 0;
    for (; j0 + 64 <= width; j0 += 64) {
        __m256 acc[8];
        for (int a = 0; a < 8; a++) acc[a] = _mm256_setzero_ps();
        for (int k = 0; k < d; k++) {
            const __m256 yk = _mm256_set1_ps(y[k]);
            const float *rk = rot_t + (int64_t)k * width + j0;
            for (int a = 0; a < 8; a++) acc[a] = _mm256_fmadd_ps(yk, _mm256_loadu_ps(rk + 8 * a), acc[a]);
        }
        for (int a = 0; a < 8; a++) _mm256_storeu_ps(o + j0 + 8 * a, acc[a]);
    }
    rotate_back_columns(y, d, rot_t, width, j0, o);
}

/* The same with 16-float registers, where the CPU has AVX-512: half the multiply-add
   instructions, which is what a rotated row's decode is bound by (1.06x (1.04..1.07) over the
   AVX2 loop with uniform IDs on the dims-16x table, interleaved A/B; same sums in the same
   order, so the same floats). */
__attribute__((target("avx512f"))) static inline void rotate_back_avx512(const float *y, int d, const float *rot_t, int64_t width,
                                                                        float *o) {
    int64_t j0 = 0;
    for (; j0 + 64 <= width; j0 += 64) {
        __m512 acc[4];
        for (int a = 0; a < 4; a++) acc[a] = _mm512_setzero_ps();
        for (int k = 0; k < d; k++) {
            const __m512 yk = _mm512_set1_ps(y[k]);
            const float *rk = rot_t + (int64_t)k * width + j0;
            for (int a = 0; a < 4; a++) acc[a] = _mm512_fmadd_ps(yk, _mm512_loadu_ps(rk + 16 * a), acc[a]);
        }
        for (int a = 0; a < 4; a++) _mm512_storeu_ps(o + j0 + 16 * a, acc[a]);
    }
    rotate_back_columns(y, d, rot_t, width, j0, o);
}
#endif

static inline void decode_row(const uint8_t *restrict row, int bits, int d, int width, float *restrict o) {
#ifdef HAVE_X86_SIMD
    if (use_avx2 && bits != 32) {
        if (bits == 16) {
            half_to_float_f16c(row, d, o);
        } else {
            const float scale = load_half(row), bias = load_half(row + 2);
            if (bits == 8)
                dequant8_avx2(row + 4, d, scale, bias, o);
            else
                dequant_planes_avx2(row + 4, d, bits, scale, bias, o);
        }
        if (d < width) memset(o + d, 0, (size_t)(width - d) * 4);
        return;
    }
#endif
    if (bits == 32) {
        memcpy(o, row, (size_t)d * 4);
    } else if (bits == 16) {
        for (int j = 0; j < d; j++) o[j] = load_half(row + 2 * j);
    } else {
        const float scale = load_half(row), bias = load_half(row + 2);
        const uint8_t *restrict codes = row + 4;
        if (bits == 8) {
            for (int j = 0; j < d; j++) o[j] = (float)codes[j] * scale + bias;
        } else {
            const int per = 8 / bits, stride = (d + per - 1) / per;
            const uint8_t mask = (uint8_t)((1 << bits) - 1);
            for (int p = 0; p < per; p++) {
                const int first = p * stride;
                const int count = d - first < stride ? d - first : stride;
                const int shift = p * bits;
                float *restrict op = o + first;
                for (int k = 0; k < count; k++) op[k] = (float)((codes[k] >> shift) & mask) * scale + bias;
            }
        }
    }
    if (d < width) memset(o + d, 0, (size_t)(width - d) * 4);
}

/* A product-quantization row: m gathers of s = d/m fp16 centroid coordinates (layout above).
 * fp16 -> fp32 is exact both through the table and through F16C, so this matches the torch
 * reference bit for bit. */
static inline void decode_pq_row(const uint8_t *restrict row, const row_class_t *c, int width, float *restrict o) {
    const int m = c->pq_m, bits = c->bits, d = c->dim, s = d / m, k = 1 << bits;
    const int row_bytes = (int)c->row_bytes;
    const uint32_t mask = (uint32_t)k - 1;
    for (int j = 0; j < m; j++) {
        uint32_t code;
        if (bits == 8) { /* byte-aligned widths need no straddle check */
            code = row[j];
        } else if (bits == 4) {
            code = (row[j >> 1] >> ((j & 1) << 2)) & 15u;
        } else {
            const int bit = j * bits, byte = bit >> 3;
            uint32_t v = row[byte];
            if (byte + 1 < row_bytes) v |= (uint32_t)row[byte + 1] << 8;
            code = (v >> (bit & 7)) & mask;
        }
        const uint16_t *centroid = c->codebook + ((int64_t)j * k + code) * s;
        float *restrict oj = o + (int64_t)j * s;
#ifdef HAVE_X86_SIMD
        if (use_avx2) {
            half_to_float_f16c((const uint8_t *)centroid, s, oj);
            continue;
        }
#endif
        for (int t = 0; t < s; t++) oj[t] = f16_table[centroid[t]];
    }
    if (d < width) memset(o + d, 0, (size_t)(width - d) * 4);
}

static inline void decode_any(const uint8_t *restrict row, const row_class_t *c, int width, float *restrict o) {
    if (c->pq_m > 0)
        decode_pq_row(row, c, width, o);
    else
        decode_row(row, c->bits, c->dim, width, o);
}

/* How IDs become locators.  kind RESOLVED: the IDs already are locators (the caller resolved
 * them).  DENSE: locator = dense_locator[id] for 0 <= id < n_dense.  HASH: `slots` is the
 * open-addressing table of hashindex.c (12-byte slots, hashslot.h) with `n` = its capacity (any
 * value in [16, 2**30]; home and wrap in hashslot.h): locate_one hashes an ID and
 * prefetches the bytes of their home slot and the two after it (at load 0.7 a hit is 2.2 slots
 * from home on average; prefetching only the home slot left the next line to miss in resolve_one:
 * 4-5% of keyed lookup speed, interleaved A/B), resolve_one probes (the slots already in cache) and
 * prefetches the row.  Kind 3 was the format-2 hash layout (separate key and locator
 * arrays); it is retired, so a library that predates kind 4 rejects the new one instead of
 * misreading it.  KEYED: `keys` is sorted;
 * `fence[f] = keys[f * FENCE]` is a sparse copy small enough to stay in cache, so finding an ID
 * is a search of the fence (cached) and then of one run of FENCE keys (one burst of misses,
 * prefetched a block ahead).  An unsorted-insert delta part, also sorted, overrides the main part. */
enum { INDEX_RESOLVED = 0, INDEX_DENSE = 1, INDEX_KEYED = 2, INDEX_HASH = 4, INDEX_STATIC_HASH = 5 };
#define FENCE 16

typedef struct {
    int32_t kind;
    int32_t pad;
    const int32_t *locator; /* DENSE: [n]; KEYED: parallel to keys */
    int64_t n;              /* DENSE: locator length; KEYED: number of keys; HASH: capacity */
    const int64_t *keys;    /* KEYED: sorted keys */
    const int64_t *fence;
    int64_t n_fence;
    const int64_t *delta_keys;
    const int32_t *delta_locator;
    int64_t n_delta;
    const uint8_t *slots; /* HASH, STATIC_HASH: [n] 12-byte slots (hashslot.h; the overflow of STATIC_HASH) */
    const uint8_t *mslots;  /* STATIC_HASH: [m] 12-byte static slots */
    int64_t m;
    const uint16_t *pilots; /* STATIC_HASH: [nb] pilots */
    int64_t nb;
} index_t;

/* number of elements of sorted a[0..n) that are <= key.  Branch-free: a lookup's key is random,
 * so a branchy search mispredicts about half of its steps, which costs more than the cache misses
 * it has on the fence.  The step is a mask, not `cond ? base + half : base`: gcc turned that into
 * a conditional move while the search sat in its own stage function, but into a branch once it
 * was inlined into the per-kind pipeline, which halved sorted-index lookups (0.12x of dense
 * against 0.25x; the mask, same run: 0.24x); keyed_locate_block's fence search likewise. */
static inline int64_t count_le(const int64_t *a, int64_t n, int64_t key) {
    if (n <= 0) return 0;
    const int64_t *base = a;
    while (n > 1) {
        const int64_t half = n >> 1;
        base += half & -(int64_t)(base[half] <= key);
        n -= half;
    }
    return (base - a) + (*base <= key);
}

static inline int32_t find_in(const int64_t *keys, const int32_t *locator, int64_t n, int64_t key) {
    const int64_t pos = count_le(keys, n, key) - 1;
    return (pos >= 0 && keys[pos] == key) ? locator[pos] : -1;
}

/* STATIC_HASH: two passes.  The first (static_positions) computes every ID's static slot into
 * loc_out: hash, bucket, pilot, position, with the pilot prefetched PILOT_AHEAD IDs before it is
 * read (hash_one keeps the bucket beside the hash's low half in a ring of PILOT_RING, so the
 * position step neither hashes again nor recomputes the bucket).  The second is the pipeline
 * every index runs (run_ids), its locate step a prefetch of the slot at that position, as
 * dense's is of its locator.  Measured on the 8x table (raw C, alternated batch by batch, 7
 * rounds; bench/results/keyed_probe_ab.md, session 22): against one pipeline with the pilot as
 * a third stage before locate, 1.10x-1.18x uniform and 1.07x-1.11x Zipf at PILOT_AHEAD 16-32,
 * 1.06x / 1.04x at 8; this build against that one, 1.12x (1.01..1.15) / 1.04x (0.99..1.09).
 * The pilot reads (a 400 KiB array) no longer
 * share the pipeline's fill buffers and registers with the slot and row misses, and the second
 * pass is the loop dense runs.  Reading the pilot unprefetched cost up to 10% (session 18). */
#ifndef PILOT_AHEAD
#define PILOT_AHEAD 24
#endif
#ifndef PILOT_RING
#define PILOT_RING 32 /* a power of two > PILOT_AHEAD; the ring is indexed by an unsigned ID
                       * position, so k % PILOT_RING is one and: as a signed int64, gcc emitted
                       * the sign fix-up of %, 8 instructions per ID (callgrind, 164 vs 172) */
#endif

static inline __attribute__((always_inline)) void hash_one(int64_t k, const int64_t *ids, const index_t *ix, uint64_t *hashed) {
    const uint64_t h = hslot_mix((uint64_t)ids[k]);
    const uint64_t b = (uint64_t)mph_bucket(h, ix->nb);
    hashed[(uint64_t)k % PILOT_RING] = (b << 32) | (uint32_t)h; /* the bucket and the hash's low half */
    __builtin_prefetch(ix->pilots + b, 0, 3);
}

/* STATIC_HASH's first pass: the static slot of IDs lo..hi into loc_out (m < 2**31, so it fits
 * an int32), where the second pass's locate and resolve steps find it */
static inline __attribute__((always_inline)) void static_positions(int64_t lo, int64_t hi, const int64_t *ids, const index_t *ix,
                                                                   int32_t *loc_out) {
    uint64_t hashed[PILOT_RING]; /* the ring entry of ID k in hashed[k % PILOT_RING] */
    for (int64_t k = lo; k < lo + PILOT_AHEAD && k < hi; k++) hash_one(k, ids, ix, hashed);
    for (int64_t k = lo; k < hi; k++) {
        if (k + PILOT_AHEAD < hi) hash_one(k + PILOT_AHEAD, ids, ix, hashed);
        const uint64_t e = hashed[(uint64_t)k % PILOT_RING];
        loc_out[k] = (int32_t)mph_pos(e, mph_pilot_mix(ix->pilots[e >> 32]), ix->m);
    }
}

/* The steps of one ID.  locate: start the slowest load (DENSE: the locator entry; HASH: the
 * home slot, parked in loc_out).  resolve: the locator (the entry or slot is in cache by now),
 * into loc_out, and a prefetch of its row.  KEYED locates a whole block at a time (below). */
static inline __attribute__((always_inline)) void locate_one(const int kind, int64_t i, const int64_t *ids, const index_t *ix,
                                                             int32_t *loc_out) {
    if (kind == INDEX_DENSE) {
        const int64_t key = ids[i];
        if (key >= 0 && key < ix->n) __builtin_prefetch(ix->locator + key, 0, 3);
    } else if (kind == INDEX_HASH) {
        /* park the ID's home slot in loc_out (capacity <= 2**30, so it fits an int32) */
        const int64_t s = hslot_home(ids[i], ix->n);
        loc_out[i] = (int32_t)s;
        const uint8_t *slot = ix->slots + HSLOT_BYTES * s;
        __builtin_prefetch(slot, 0, 3);
        __builtin_prefetch(slot + 3 * HSLOT_BYTES - 1, 0, 3); /* through the 3rd slot: at most one more line */
    } else if (kind == INDEX_STATIC_HASH) {
        /* the static slot static_positions parked in loc_out (a 12-byte slot straddles a line
           boundary for 2 slots in 16) */
        const uint8_t *slot = ix->mslots + HSLOT_BYTES * (int64_t)loc_out[i];
        __builtin_prefetch(slot, 0, 3);
        __builtin_prefetch(slot + HSLOT_BYTES - 1, 0, 3);
    }
}

/* the overflow's probe from slot s (HASH: the home slot) for key; -1 when absent */
static inline int32_t probe_slots(const uint8_t *slots, int64_t cap, int64_t s, int64_t key) {
    if (key == HSLOT_EMPTY) return -1;
    s = hslot_stop(slots, cap, s, key);
    return hslot_key(slots, s) == key ? hslot_loc(slots, s) : -1;
}

static inline __attribute__((always_inline)) void resolve_one(const int kind, int64_t i, const int64_t *ids, const index_t *ix,
                                                              const row_class_t *classes, int32_t *loc_out) {
    int32_t loc;
    const int64_t key = ids[i];
    if (kind == INDEX_DENSE) {
        loc = (key >= 0 && key < ix->n) ? ix->locator[key] : -1;
    } else if (kind == INDEX_HASH) {
        /* A plain probe loop, measured against (bench/results/keyed_probe_ab.md): a branch-free
           compare of the prefetched 3- or 4-slot window (0.94x-0.97x), a two-pass probe-then-
           decode (0.93x), and a split resolve that finishes full windows AHEAD/2 later (0.87x-
           0.93x).  What it costs is the ~13% of keys past the window (a demand miss); hot keys
           avoid it by being inserted first (HashIndex.build's frequencies). */
        loc = probe_slots(ix->slots, ix->n, loc_out[i], key);
    } else if (kind == INDEX_STATIC_HASH) {
        /* one static slot; the overflow only for an ID that is not there (a free static slot
           has locator -1, so a query of EMPTY itself ends here too) */
        const int64_t s = loc_out[i];
        if (hslot_key(ix->mslots, s) == key)
            loc = hslot_loc(ix->mslots, s);
        else
            loc = probe_slots(ix->slots, ix->n, hslot_home(key, ix->n), key);
    } else if (kind == INDEX_KEYED) {
        const int64_t f = loc_out[i];
        loc = -1;
        if (f >= 0) {
            const int64_t start = f * FENCE;
            const int64_t len = ix->n - start < FENCE ? ix->n - start : FENCE;
            loc = find_in(ix->keys + start, ix->locator + start, len, key);
        }
        if (ix->n_delta) {
            const int64_t pos = count_le(ix->delta_keys, ix->n_delta, key) - 1;
            if (pos >= 0 && ix->delta_keys[pos] == key) loc = ix->delta_locator[pos];
        }
    } else {
        loc = (int32_t)key;
    }
    loc_out[i] = loc;
    if (loc >= 0) {
        const row_class_t *c = &classes[loc >> CLASS_SHIFT];
        if (c->row_bytes > 0) {
            const uint8_t *row = c->base + (int64_t)(loc & SLOT_MASK) * c->row_bytes;
            __builtin_prefetch(row, 0, 3);
            __builtin_prefetch(row + c->row_bytes - 1, 0, 3);
        }
    }
}

/* KEYED, the locate step for IDs lo..hi: the fence searches of the whole block, one level at a time
 * (the block's loads at a level are independent, so their cache misses overlap instead of
 * queueing per ID); parks each ID's fence position in loc_out and prefetches its key run. */
static inline void keyed_locate_block(int64_t lo, int64_t hi, const int64_t *ids, const index_t *ix, int32_t *loc_out) {
    int64_t base[BLOCK];
    const int64_t m = hi - lo;
    for (int64_t i = 0; i < m; i++) base[i] = 0;
    int64_t len = ix->n_fence;
    while (len > 1) {
        const int64_t half = len >> 1;
        for (int64_t i = 0; i < m; i++) base[i] += half & -(int64_t)(ix->fence[base[i] + half] <= ids[lo + i]);
        len -= half;
    }
    for (int64_t i = lo; i < hi; i++) {
        const int64_t f = ix->n_fence ? base[i - lo] + (ix->fence[base[i - lo]] <= ids[i]) - 1 : -1;
        loc_out[i] = (int32_t)f;
        if (f >= 0) {
            const int64_t *run = ix->keys + f * FENCE;
            for (int k = 0; k < FENCE * 8; k += 64) __builtin_prefetch((const char *)run + k, 0, 3);
            __builtin_prefetch(ix->locator + f * FENCE, 0, 3);
            __builtin_prefetch(ix->locator + f * FENCE + FENCE - 1, 0, 3);
        }
    }
}

/* How the rows of a class decode, decided once per call from its row_class_t (not per row):
 * the common quantized classes of a table's own width take a path compiled for their bit
 * width (inlined into run_range, so each of its clones vectorizes it for its target); pruned
 * rows are zeros; fp16 and fp32 rows of the table's width convert or copy inline; everything
 * else (PQ, rotated, narrower than the table) takes decode_other.  fp16 inline: the hottest rows
 * of a frequency-allocated table are its fp16 ones, so Zipf traffic decodes them most (8x table,
 * batch 4096, interleaved A/B against the call through decode_other: 1.05x (0.91..1.22) and
 * 1.08x (1.02..1.23) Zipf in two runs, uniform unchanged). */
enum { RK_ZERO = 0, RK_Q8, RK_Q4, RK_Q2, RK_Q1, RK_F16, RK_F32, RK_R8, RK_R4, RK_R2, RK_OTHER };
/* RK_R*: a truncated (dim < width, dim <= 64) quantized class of a rotated table (decode_rot) */

static inline int row_kind(const row_class_t *c, int64_t width) {
    if (c->dim == 0) return RK_ZERO;
    if (c->rotation_t && c->pq_m == 0 && c->dim <= 64 && c->dim < width) {
        switch (c->bits) {
        case 8: return RK_R8;
        case 4: return RK_R4;
        case 2: return RK_R2;
        default: return RK_OTHER;
        }
    }
    if (c->rotation_t || c->pq_m > 0 || c->dim != width) return RK_OTHER;
    switch (c->bits) {
    case 8: return RK_Q8;
    case 4: return RK_Q4;
    case 2: return RK_Q2;
    case 1: return RK_Q1;
    case 16: return RK_F16;
    case 32: return RK_F32;
    default: return RK_OTHER;
    }
}

/* Quantized codes of a `bits`-wide class (planar, layout above), with bits a compile-time
 * constant: plane p is the run of output floats o[p*stride ..) read from the code bytes
 * shifted right by p*bits, a loop the compiler vectorizes. */
static inline __attribute__((always_inline)) void dequant_q(const int bits, const uint8_t *restrict codes, int d, float scale,
                                                            float bias, float *restrict o) {
    const int per = 8 / bits, stride = (d + per - 1) / per;
    for (int p = 0; p < per; p++) {
        const int first = p * stride, count = d - first < stride ? d - first : stride;
        float *restrict op = o + first;
        for (int k = 0; k < count; k++) op[k] = (float)((codes[k] >> (p * bits)) & ((1 << bits) - 1)) * scale + bias;
    }
}

static inline __attribute__((always_inline)) void decode_q(const int bits, const uint8_t *restrict row, int d, float *restrict o) {
    const float scale = load_half(row), bias = load_half(row + 2);
    if (d == 64) /* the common width: constant trip counts, no remainder loops */
        dequant_q(bits, row + 4, 64, scale, bias, o);
    else
        dequant_q(bits, row + 4, d, scale, bias, o);
}

/* fp16 rows of the table's width: the hottest rows of a frequency-allocated table, so under
 * skewed traffic the most decoded kind - F16C where the CPU has it, else the 64K-entry table. */
static inline __attribute__((always_inline)) void decode_f16(const uint8_t *restrict row, int d, float *restrict o) {
#ifdef HAVE_X86_SIMD
    if (use_avx2) {
        half_to_float_f16c(row, d, o);
        return;
    }
#endif
    for (int j = 0; j < d; j++) o[j] = load_half(row + 2 * j);
}

/* x = y R^T for a truncated row's dim coordinates y (decode_other, decode_rot): AVX-512 or AVX2
   multiply-adds where the CPU has them, else one contiguous axpy per k. */
static inline __attribute__((always_inline)) void rotate_back(const float *y, int d, const float *rot_t, int64_t width,
                                                              float *restrict o) {
#ifdef HAVE_X86_SIMD
    if (use_avx512) {
        rotate_back_avx512(y, d, rot_t, width, o);
        return;
    }
    if (use_avx2) {
        rotate_back_avx2(y, d, rot_t, width, o);
        return;
    }
#endif
    memset(o, 0, (size_t)width * 4);
    for (int k = 0; k < d; k++) {
        const float yk = y[k];
        const float *restrict rk = rot_t + (int64_t)k * width;
        for (int64_t j = 0; j < width; j++) o[j] += yk * rk[j];
    }
}

/* Rows of the classes without a specialised path (RK_OTHER). */
static void decode_other(const uint8_t *restrict row, const row_class_t *c, int64_t width, float *restrict o) {
    if (c->rotation_t) {
        /* stored y = (x R)[:dim]; x = sum_k y[k] * R^T[k, :], one contiguous axpy per k
           (R^T fp32: the decoder's copy, read as it is) */
        float y[MAX_ROTATED_DIM];
        decode_any(row, c, c->dim, y);
        rotate_back(y, c->dim, c->rotation_t, width, o);
    } else {
        decode_any(row, c, (int)width, o);
    }
}

/* A truncated quantized row of a rotated table (RK_R8/4/2: the bulk of a dims-16x table's rows):
   its dim coordinates y dequantized with the bit width a constant, then x = y R^T.  Against the
   call through decode_other (runtime bit width, decode_any's dispatch): 1.16x (1.12..1.18) with
   uniform IDs, 1.04x Zipf, on bench/results/lookup.md's dims-16x table (interleaved A/B, same
   floats). */
static inline __attribute__((always_inline)) void decode_rot(const int bits, const uint8_t *restrict row, const row_class_t *c,
                                                             int64_t width, float *restrict o) {
    float y[64];
    const int d = c->dim;
    dequant_q(bits, row + 4, d, load_half(row), load_half(row + 2), y);
    rotate_back(y, d, c->rotation_t, width, o);
}

/* Decode one located row into o; returns 1 when the ID had no row. */
static inline __attribute__((always_inline)) int decode_one(int32_t loc, const row_class_t *classes, const uint8_t *kinds,
                                                            float *restrict o, int64_t width) {
    if (loc < 0) {
        memset(o, 0, (size_t)width * 4);
        return 1;
    }
    const int cls = loc >> CLASS_SHIFT;
    const row_class_t *c = &classes[cls];
    const uint8_t *row = c->base + (int64_t)(loc & SLOT_MASK) * c->row_bytes;
    switch (kinds[cls]) {
    case RK_ZERO: /* pruned row: stored nothing, decodes to zeros */
        memset(o, 0, (size_t)width * 4);
        break;
    case RK_Q4: decode_q(4, row, (int)width, o); break;
    case RK_Q2: decode_q(2, row, (int)width, o); break;
    case RK_Q8: decode_q(8, row, (int)width, o); break;
    case RK_Q1: decode_q(1, row, (int)width, o); break;
    case RK_F16: decode_f16(row, (int)width, o); break;
    case RK_F32: memcpy(o, row, (size_t)width * 4); break;
    case RK_R4: decode_rot(4, row, c, width, o); break;
    case RK_R2: decode_rot(2, row, c, width, o); break;
    case RK_R8: decode_rot(8, row, c, width, o); break;
    default: decode_other(row, c, width, o);
    }
    return 0;
}

#ifndef AHEAD
#define AHEAD 16
#endif

/* DENSE, HASH and RESOLVED: a software pipeline per ID.  Iteration i locates ID i + 2*AHEAD,
 * resolves ID i + AHEAD and decodes ID i, so each ID's two dependent loads are in flight for
 * AHEAD decodes each, and misses are issued at an even rate. */
static inline __attribute__((always_inline)) int64_t run_ids(const int kind, int64_t lo, int64_t hi, const int64_t *ids,
                                                             const index_t *ix, const row_class_t *classes, const uint8_t *kinds,
                                                             float *out, int64_t width, int32_t *loc_out) {
    int64_t unknown = 0, i = lo;
    if (kind == INDEX_STATIC_HASH) static_positions(lo, hi, ids, ix, loc_out); /* its first pass */
    const int64_t warm = hi - lo < 2 * AHEAD ? hi : lo + 2 * AHEAD;
    for (int64_t k = lo; k < warm; k++) locate_one(kind, k, ids, ix, loc_out);
    for (int64_t k = lo; k < (hi - lo < AHEAD ? hi : lo + AHEAD); k++) resolve_one(kind, k, ids, ix, classes, loc_out);
    for (; i + 2 * AHEAD < hi; i++) {
        locate_one(kind, i + 2 * AHEAD, ids, ix, loc_out);
        resolve_one(kind, i + AHEAD, ids, ix, classes, loc_out);
        unknown += decode_one(loc_out[i], classes, kinds, out + i * width, width);
    }
    for (; i < hi; i++) {
        if (i + AHEAD < hi) resolve_one(kind, i + AHEAD, ids, ix, classes, loc_out);
        unknown += decode_one(loc_out[i], classes, kinds, out + i * width, width);
    }
    return unknown;
}

#define BLOCK_END(b) ((b) + BLOCK < hi ? (b) + BLOCK : hi)

/* KEYED: the block pipeline.  While block k is decoded, block k+1 is resolved (rows
 * prefetched) and block k+2 located (fence searched, key runs prefetched). */
static inline int64_t run_keyed(int64_t lo, int64_t hi, const int64_t *ids, const index_t *ix, const row_class_t *classes,
                                const uint8_t *kinds, float *out, int64_t width, int32_t *loc_out) {
    int64_t unknown = 0;
    keyed_locate_block(lo, BLOCK_END(lo), ids, ix, loc_out);
    if (lo + BLOCK < hi) keyed_locate_block(lo + BLOCK, BLOCK_END(lo + BLOCK), ids, ix, loc_out);
    for (int64_t k = lo; k < BLOCK_END(lo); k++) resolve_one(INDEX_KEYED, k, ids, ix, classes, loc_out);
    for (int64_t start = lo; start < hi; start += BLOCK) {
        const int64_t next = start + BLOCK, after = start + 2 * BLOCK;
        if (after < hi) keyed_locate_block(after, BLOCK_END(after), ids, ix, loc_out);
        if (next < hi)
            for (int64_t k = next; k < BLOCK_END(next); k++) resolve_one(INDEX_KEYED, k, ids, ix, classes, loc_out);
        for (int64_t k = start; k < BLOCK_END(start); k++) unknown += decode_one(loc_out[k], classes, kinds, out + k * width, width);
    }
    return unknown;
}

MULTIVERSION
static int64_t run_range(int64_t lo, int64_t hi, const int64_t *ids, const index_t *ix, const row_class_t *classes,
                         float *out, int64_t width, int32_t *loc_out) {
    if (lo >= hi) return 0;
    uint8_t kinds[MAX_CLASSES];
    for (int k = 0; k < MAX_CLASSES; k++) kinds[k] = (uint8_t)row_kind(&classes[k], width);
    switch (ix->kind) {
    case INDEX_DENSE: return run_ids(INDEX_DENSE, lo, hi, ids, ix, classes, kinds, out, width, loc_out);
    case INDEX_HASH: return run_ids(INDEX_HASH, lo, hi, ids, ix, classes, kinds, out, width, loc_out);
    case INDEX_STATIC_HASH: return run_ids(INDEX_STATIC_HASH, lo, hi, ids, ix, classes, kinds, out, width, loc_out);
    case INDEX_KEYED: return run_keyed(lo, hi, ids, ix, classes, kinds, out, width, loc_out);
    default: return run_ids(INDEX_RESOLVED, lo, hi, ids, ix, classes, kinds, out, width, loc_out);
    }
}

/* float32 -> fp16 and bf16, round to nearest even: the service's 16-bit answers, narrowed from
 * the decoder's float32 rows in one pass (pyentry.c's lookup_answer) where torch's copy_ took
 * two tensor wrappers and, for bf16, a slower loop (a batch-1024 bf16 answer cost twice a
 * float32 one).  Finite values come out exactly as torch's conversions give them; NaN becomes
 * a quiet NaN of the same sign (fp16: 0x7e00 | sign without F16C, the payload's top bits with
 * it, as torch's scalar and vector paths differ there too) and 0x7fc0 for bf16.
 *
 * fp16 without F16C: rebias the exponent and round the 13 dropped mantissa bits to even on the
 * integer, with floats doing the work for results below fp16's normal range (the hardware
 * rounds x * 2^-14 ... exactly once there); fp-contract off so that no multiply-add fuses. */
__attribute__((optimize("fp-contract=off"))) static uint16_t float_to_half_rne(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: infinity */
    if (ax < 0x38800000u) {
        /* below 2^-14: a subnormal (or zero) fp16, units of 2^-24.  Adding 0.5 (2^-1) to
           |f| in float rounds |f| to a multiple of 2^-24 (the ulp of a float in [0.5, 1)) to
           nearest even, in one rounding; the mantissa then holds the count */
        float a;
        memcpy(&a, &ax, 4);
        const float biased = a + 0.5f;
        uint32_t b;
        memcpy(&b, &biased, 4);
        return (uint16_t)(sign | (b - 0x3f000000u));
    }
    const uint32_t r = ax - 0x38000000u; /* exponent 127 -> 15 bias */
    return (uint16_t)(sign | ((r + 0x0fffu + ((r >> 13) & 1u)) >> 13));
}

static inline uint16_t float_to_bf16_rne(uint32_t x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

#ifdef HAVE_X86_SIMD
__attribute__((target("avx2,f16c"))) static void narrow_f16_f16c(const float *src, int64_t count, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < count; i++) dst[i] = (uint16_t)_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* float_to_bf16_rne 16 values at a time (gcc leaves the scalar loop with its NaN test unvectorized) */
__attribute__((target("avx2"))) static inline __m256i bf16_rne_avx2(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

__attribute__((target("avx2"))) static void narrow_bf16_avx2(const float *src, int64_t count, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        const __m256i lo = bf16_rne_avx2(_mm256_loadu_ps(src + i)), hi = bf16_rne_avx2(_mm256_loadu_ps(src + i + 8));
        /* packus interleaves 128-bit lanes (lo0-3 hi0-3 lo4-7 hi4-7): put them back in order */
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8));
    }
    const uint32_t *bits = (const uint32_t *)src;
    for (; i < count; i++) dst[i] = float_to_bf16_rne(bits[i]);
}
#endif

/* kind 2: fp16, kind 3: bf16 (the wire's dtype codes, service/wire.py); -1 for another kind. */
int32_t embserve_narrow(const float *src, int64_t count, uint16_t *dst, int32_t kind) {
    if (!f16_ready) embserve_init();
    if (kind == 2) {
#ifdef HAVE_X86_SIMD
        if (use_avx2) {
            narrow_f16_f16c(src, count, dst);
            return 0;
        }
#endif
        for (int64_t i = 0; i < count; i++) dst[i] = float_to_half_rne(src[i]);
        return 0;
    }
    if (kind == 3) {
#ifdef HAVE_X86_SIMD
        if (use_avx2) {
            narrow_bf16_avx2(src, count, dst);
            return 0;
        }
#endif
        const uint32_t *bits = (const uint32_t *)src;
        for (int64_t i = 0; i < count; i++) dst[i] = float_to_bf16_rne(bits[i]);
        return 0;
    }
    return -1;
}

/* pruned[i] = 1 where loc[i] names a row of a pruned (dim-0) class, else 0; returns how many.
 * A table serves its pruned rows by its unknown-ID policy, so its lookup needs this mask: one
 * pass here where torch took five ops over the locators (as long as the decode of a 16x table,
 * whose pruned rows are a quarter of its traffic).  classes: MAX_CLASSES entries, as for
 * embserve_lookup. */
int64_t embserve_pruned_mask(const int32_t *loc, int64_t n, const row_class_t *classes, uint8_t *pruned) {
    uint8_t zero[MAX_CLASSES];
    for (int k = 0; k < MAX_CLASSES; k++) zero[k] = classes[k].dim == 0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t l = loc[i];
        const uint8_t p = l >= 0 && zero[l >> CLASS_SHIFT];
        pruned[i] = p;
        count += p;
    }
    return count;
}

/* ids:      int64 [n]: raw IDs, or locators when index->kind == INDEX_RESOLVED
 * index:    how IDs map to locators (see index_t)
 * classes:  exactly MAX_CLASSES entries (unused ones dim 0), so any locator's class field
 *           indexes inside it; slots are validated against slab capacity when a table loads
 * out:      float32 [n, width], row-major; every element is written
 * loc_out:  int32 [n]; the locator of each ID (-1 = unknown), for the caller's found mask
 * threads:  <= 1 runs serially on the calling thread
 * Returns the number of IDs without a row, or -1 for bad arguments. */
int64_t embserve_lookup(const int64_t *ids, int64_t n, const index_t *index, const row_class_t *classes,
                        int32_t n_classes, float *out, int64_t width, int32_t *loc_out, int32_t threads) {
    if (!f16_ready) embserve_init();
    if (n_classes != MAX_CLASSES || index->kind < INDEX_RESOLVED || index->kind > INDEX_STATIC_HASH || index->kind == 3) return -1;
    if ((index->kind == INDEX_HASH || index->kind == INDEX_STATIC_HASH) && (index->n < 2 || index->n > ((int64_t)1 << 30)))
        return -1; /* any capacity (hashslot.h) */
    if (index->kind == INDEX_STATIC_HASH && (index->m < 1 || index->m > ((int64_t)1 << 31) - 1 || index->nb < 1 || !index->mslots || !index->pilots))
        return -1;
    int64_t chunks = threads > 1 ? threads : 1;
    if (chunks > 1 && n < chunks * 4 * BLOCK) chunks = 1;
    /* one chunk: no OpenMP region at all (entering one, even with if(0), costs about a
       microsecond: the whole bill of a batch-1 lookup) */
    if (chunks == 1) return run_range(0, n, ids, index, classes, out, width, loc_out);
    const int64_t per = ((n + chunks - 1) / chunks + BLOCK - 1) / BLOCK * BLOCK;
    int64_t unknown = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)chunks) if (chunks > 1) reduction(+ : unknown)
#endif
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t lo = ch * per;
        const int64_t hi = lo + per < n ? lo + per : n;
        unknown += run_range(lo, hi, ids, index, classes, out, width, loc_out);
    }
    return unknown;
}
