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
 * Tried and not kept (bench/results/hash_layout_ab.md, an interleaved A/B of two builds):
 * cache-line buckets (5 slots per 64-byte line, home = the first slot of the home bucket, a
 * branch-free probe of the whole bucket, optionally a one-bit-per-bucket overflow hint that
 * prefetches the next line), at the same bytes (load 0.75): 0.90x / 0.91x of this layout's
 * lookup speed (uniform / Zipf).  Homes at a bucket's start overflow for 18% of keys at 0.75, and
 * those misses cost more than the half line per key this layout prefetches beyond one.
 * Prefetching 5 or 6 slots instead of 3 (runs not recorded there): 1.00x-1.05x, within the noise.
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

static inline uint64_t hslot_mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* home slot in [0, cap): the mix's top 32 bits scaled by cap (one multiply, no division) */
static inline int64_t hslot_home(int64_t key, int64_t cap) {
    return (int64_t)(((hslot_mix((uint64_t)key) >> 32) * (uint64_t)cap) >> 32);
}

/* the probe's next slot (the branch is almost never taken: a compiler emits a cmov) */
static inline int64_t hslot_next(int64_t s, int64_t cap) { return s + 1 == cap ? 0 : s + 1; }

/* cyclic distance from a to b going forward (a, b in [0, cap)) */
static inline int64_t hslot_dist(int64_t a, int64_t b, int64_t cap) { return b >= a ? b - a : b - a + cap; }

/* memcpy: a slot's key is only 4-byte aligned (the compiler emits one unaligned load) */
static inline int64_t hslot_key(const uint8_t *slots, int64_t s) {
    int64_t k;
    memcpy(&k, slots + HSLOT_BYTES * s, 8);
    return k;
}

static inline int32_t hslot_loc(const uint8_t *slots, int64_t s) {
    int32_t l;
    memcpy(&l, slots + HSLOT_BYTES * s + 8, 4);
    return l;
}

static inline void hslot_set(uint8_t *slots, int64_t s, int64_t key, int32_t loc) {
    memcpy(slots + HSLOT_BYTES * s, &key, 8);
    memcpy(slots + HSLOT_BYTES * s + 8, &loc, 4);
}

/* where a probe from slot s for key stops: the slot holding key, or else the first free slot
 * (the load stays below 1, so there is one) */
static inline int64_t hslot_stop(const uint8_t *slots, int64_t cap, int64_t s, int64_t key) {
    for (;;) {
        const int64_t k = hslot_key(slots, s);
        if (k == key || k == HSLOT_EMPTY) return s;
        s = hslot_next(s, cap);
    }
}

static inline void hslot_set_loc(uint8_t *slots, int64_t s, int32_t loc) { memcpy(slots + HSLOT_BYTES * s + 8, &loc, 4); }

/* The static part (format 4): one slot per ID for the IDs held when it was last built, so that
 * a lookup reads one slot instead of probing (compression/hash_index.py has the why and the
 * measurements; the search that finds the pilots is embserve_mph_build in hashindex.c).
 *
 *   pilots   uint16 [nb]: one pilot per bucket of about 5 IDs
 *   mslots   m slots of the 12-byte layout above (EMPTY = free), m ~ IDs / 0.94
 *   h        = fmix64(uint64 key)
 *   bucket   = ((h >> 32) * nb) >> 32                     (the hash's top half)
 *   x        = ((uint32)h ^ (uint32)(pilot * 0x9e3779b1)) * 0x85ebca6b     (uint32 arithmetic)
 *   pos      = (x * m) >> 32                                (from the hash's low half)
 *
 * A held ID sits in mslots[pos] or in the overflow slots (the open-addressing table above), never
 * in both: a lookup reads its static slot and probes the overflow only when that slot holds
 * another key or none.  The bucket and the position take different halves of the hash, so the
 * IDs of one bucket land independently of each other.  A pilot xors the position's input (one
 * multiply by an odd constant spreads consecutive pilots over its bits; fmix64 of the pilot, two
 * multiplies more, measured no better and cost Zipf lookups 2%), and the multiply after the xor
 * carries every bit of it into the top bits the position is taken from: without it, two IDs of
 * a bucket whose hashes agree in those top bits would share a slot under every pilot (IDs 0, 1
 * and -1 at m = 4 did). */
#define MPH_PILOT_MULT 0x9e3779b1u
#define MPH_POS_MULT 0x85ebca6bu

static inline int64_t mph_bucket(uint64_t h, int64_t nb) { return (int64_t)(((h >> 32) * (uint64_t)nb) >> 32); }

static inline uint32_t mph_pilot_mix(uint32_t pilot) { return pilot * MPH_PILOT_MULT; }

static inline int64_t mph_pos(uint64_t h, uint32_t pilot_mixed, int64_t m) {
    const uint32_t x = ((uint32_t)h ^ pilot_mixed) * MPH_POS_MULT;
    return (int64_t)(((uint64_t)x * (uint64_t)m) >> 32);
}

/* the static slot of key (m > 0, nb > 0) */
static inline int64_t mph_slot(const uint16_t *pilots, int64_t nb, int64_t m, int64_t key) {
    const uint64_t h = hslot_mix((uint64_t)key);
    return mph_pos(h, mph_pilot_mix(pilots[mph_bucket(h, nb)]), m);
}

#endif
