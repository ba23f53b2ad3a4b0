/* The slot array of a keyed table's open-addressing hash index, shared by hashindex.c (writes,
 * serial find) and decode.c (the probe inside the lookup pipeline).  The same layout is described
 * in compression/hash_index.py (torch reference) and probed by compression/kernels/triton_decode.py;
 * keep the three in step.
 *
 *   slots   cap slots of 12 bytes, packed (no padding), slot s at byte 12 * s:
 *             bytes 0..7    int64 key, little-endian; EMPTY = INT64_MIN marks a free slot
 *             bytes 8..11   int32 locator (compression/layout.py); -1 in a free slot
 *           (torch holds it as int32 [cap, 3]: words 0-1 the key's low / high half, word 2 the
 *           locator, so it is 4-byte aligned and a GPU reads the key as two aligned words)
 *   cap     any capacity in [16, 2**30] (compression/hash_index.py sizes it to a multiple of 16)
 *   home(key) = ((fmix64(uint64 key) >> 32) * cap) >> 32   (multiply-high of the hash's top 32
 *           bits: cap < 2**31, so the product fits 64 bits; for cap = 2**k this is exactly the
 *           old fmix64 >> (64 - k), so power-of-two files written before any capacity was
 *           allowed probe the same)
 *   probe   s, s + 1, ... wrapping to 0 at cap (a compare, not a mask: cap need not be 2**k)
 *
 * Why any capacity: a power of two left the index at load 0.35-0.7 (24 MiB at 1M IDs where
 * load 0.7 needs 17 MiB), bytes a keyed table's budget pays for with pruned rows.
 *
 * Why key and locator share a slot: a hit then costs one cache line (two for the 2 slots in 16
 * that straddle a line boundary) instead of one line in a key array plus one in a locator array;
 * bench/results/keyed.md measured the split layout's second line as the largest part of the
 * keyed-vs-dense gap.  12 bytes, not 16: the padding would buy an aligned load that x86-64 and
 * ARM64 do not need, at a third more index bytes.
 *
 * Why fmix64 (MurmurHash3's 64-bit finalizer: xor-shift 33, multiply, xor-shift 33, multiply,
 * xor-shift 33) and not a single multiply (Fibonacci hashing, the format-2 hash): IDs in an
 * arithmetic progression (a stride, shard-interleaved IDs) hashed by one multiply land on a
 * lattice whose clusters put only about a third of the keys in their home slot at load 0.48
 * (bench keys: i * 1,000,003); the finalizer spreads every ID set like random keys (about 3 in 4
 * at home), and its two extra multiplies are hidden behind the memory loads.
 */
#ifndef EMBSERVE_HASHSLOT_H
#define EMBSERVE_HASHSLOT_H
#include <stdint.h>
#include <string.h>

#define HSLOT_EMPTY INT64_MIN
#define HSLOT_BYTES 12
#define HSLOT_PER_BUCKET 5   /* slots per 64-byte bucket (5 x 12 = 60 bytes) */
#define HSLOT_BUCKET_BYTES 64 /* one cache line; bytes 60..63 reserved (written 0) */

static inline uint64_t hslot_mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* home bucket in [0, n_buckets): the mix's top 32 bits scaled by n_buckets (one multiply) */
static inline int64_t hslot_home_bucket(int64_t key, int64_t n_buckets) {
    return (int64_t)(((hslot_mix((uint64_t)key) >> 32) * (uint64_t)n_buckets) >> 32);
}

/* home slot in [0, cap): the first slot of the home bucket (cap = 5 * n_buckets) */
static inline int64_t hslot_home(int64_t key, int64_t cap) {
    return HSLOT_PER_BUCKET * hslot_home_bucket(key, cap / HSLOT_PER_BUCKET);
}

/* the probe's next slot (the branch is almost never taken: a compiler emits a cmov) */
static inline int64_t hslot_next(int64_t s, int64_t cap) { return s + 1 == cap ? 0 : s + 1; }

/* cyclic distance from a to b going forward (a, b in [0, cap)) */
static inline int64_t hslot_dist(int64_t a, int64_t b, int64_t cap) { return b >= a ? b - a : b - a + cap; }

/* byte offset of slot s: its bucket's line, then 12 bytes per slot inside it */
static inline int64_t hslot_offset(int64_t s) {
    return HSLOT_BUCKET_BYTES * (s / HSLOT_PER_BUCKET) + HSLOT_BYTES * (s % HSLOT_PER_BUCKET);
}

/* memcpy: a slot's key is only 4-byte aligned (the compiler emits one unaligned load) */
static inline int64_t hslot_key(const uint8_t *slots, int64_t s) {
    int64_t k;
    memcpy(&k, slots + hslot_offset(s), 8);
    return k;
}

static inline int32_t hslot_loc(const uint8_t *slots, int64_t s) {
    int32_t l;
    memcpy(&l, slots + hslot_offset(s) + 8, 4);
    return l;
}

static inline void hslot_set(uint8_t *slots, int64_t s, int64_t key, int32_t loc) {
    memcpy(slots + hslot_offset(s), &key, 8);
    memcpy(slots + hslot_offset(s) + 8, &loc, 4);
}

static inline void hslot_set_loc(uint8_t *slots, int64_t s, int32_t loc) { memcpy(slots + hslot_offset(s) + 8, &loc, 4); }

/* Overflow hints: one bit per bucket, set when a held key's probe may pass through the whole
 * bucket into the next one (so a lookup homed there prefetches the next line too).  Only a
 * prefetch hint: a stale set bit costs a wasted prefetch, a clear bit where a key does pass
 * costs a cache miss, neither a wrong answer.  hints may be NULL (no hints kept). */
static inline int hslot_hint(const uint8_t *hints, int64_t bucket) { return (hints[bucket >> 3] >> (bucket & 7)) & 1; }

/* bits of buckets from (key's home bucket) up to but excluding slot s's bucket, cyclically */
static inline void hslot_hint_passed(uint8_t *hints, int64_t home_bucket, int64_t s, int64_t n_buckets) {
    if (!hints) return;
    const int64_t last = s / HSLOT_PER_BUCKET;
    for (int64_t b = home_bucket; b != last; b = b + 1 == n_buckets ? 0 : b + 1) hints[b >> 3] |= (uint8_t)(1u << (b & 7));
}

/* The lookup probe over whole buckets: the locator of key, or -1.  home_bucket from
 * hslot_home_bucket.  Valid because a held key is reachable from its home slot (its bucket's
 * first slot) without crossing a free slot: so if any of a bucket's 5 slots on the path holds
 * the key it is a hit, else if any is free it is a miss, else the probe goes on with the next
 * bucket.  The 5 compares have no branch between them: one well-predicted branch per bucket
 * instead of one (mispredicted whenever the key is not first) per slot. */
static inline int32_t hslot_probe(const uint8_t *slots, int64_t n_buckets, int64_t bucket, int64_t key) {
    if (key == HSLOT_EMPTY) return -1;
#ifdef BRANCHY_PROBE
    {
        int64_t s = HSLOT_PER_BUCKET * bucket, cap = HSLOT_PER_BUCKET * n_buckets;
        for (;;) {
            const int64_t k = hslot_key(slots, s);
            if (k == key) return hslot_loc(slots, s);
            if (k == HSLOT_EMPTY) return -1;
            s = hslot_next(s, cap);
        }
    }
#endif
    for (;;) {
        const uint8_t *b = slots + HSLOT_BUCKET_BYTES * bucket;
        int64_t k[HSLOT_PER_BUCKET];
        unsigned hit = 0, free_ = 0;
        for (int j = 0; j < HSLOT_PER_BUCKET; j++) {
            memcpy(&k[j], b + HSLOT_BYTES * j, 8);
            hit |= (unsigned)(k[j] == key) << j;
            free_ |= (unsigned)(k[j] == HSLOT_EMPTY);
        }
        if (hit) {
            int32_t l;
            memcpy(&l, b + HSLOT_BYTES * __builtin_ctz(hit) + 8, 4);
            return l;
        }
        if (free_) return -1;
        bucket = bucket + 1 == n_buckets ? 0 : bucket + 1;
    }
}

#endif
