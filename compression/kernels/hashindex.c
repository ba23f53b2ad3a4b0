/* Open-addressing hash index of a keyed table: the writes (upsert, delete, rehash) and a
 * serial find.  The lookup path probes the same arrays inside decode.c's pipeline.
 *
 * Layout (shared with the Triton kernel, keep it exactly):
 *
 *   keys     int64 [cap]   the ID in each slot; EMPTY (INT64_MIN) = free slot
 *   locator  int32 [cap]   the row of the ID in the same slot (compression/layout.py)
 *   cap      a power of two, >= 2
 *
 *   home(key) = ((uint64)key * 0x9E3779B97F4A7C15 mod 2**64) >> (64 - log2(cap))
 *
 * Linear probing: slot, slot+1, ... (mod cap) until the key or an EMPTY slot.  Deletion shifts
 * the rest of the cluster back (Knuth's algorithm R), so there are no tombstones and a probe
 * for a missing key always ends at the first EMPTY slot.  The caller keeps the load below 1
 * (it grows the table by doubling before an insert would pass its maximum load), so every
 * probe ends.  Plain C, no Python API; called through ctypes with the GIL released.
 */
#include <stdint.h>

#define HASH_EMPTY INT64_MIN
#define HASH_MULT 0x9E3779B97F4A7C15ULL

static inline int log2_cap(int64_t cap) { return 63 - __builtin_clzll((unsigned long long)cap); }

static inline int64_t home_slot(int64_t key, int shift) {
    return (int64_t)(((uint64_t)key * HASH_MULT) >> shift);
}

/* slot holding key, or -1 */
static inline int64_t find_slot(const int64_t *keys, int64_t mask, int shift, int64_t key) {
    int64_t s = home_slot(key, shift);
    for (;;) {
        const int64_t k = keys[s];
        if (k == key) return s;
        if (k == HASH_EMPTY) return -1;
        s = (s + 1) & mask;
    }
}

/* locators of ids (-1 = absent) */
void embserve_hash_find(const int64_t *keys, const int32_t *locator, int64_t cap, const int64_t *ids, int64_t n,
                        int32_t *out) {
    const int64_t mask = cap - 1;
    const int shift = 64 - log2_cap(cap);
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = ids[i] == HASH_EMPTY ? -1 : find_slot(keys, mask, shift, ids[i]);
        out[i] = s >= 0 ? locator[s] : -1;
    }
}

/* Upsert (ids[i] -> locs[i]) in order; a later duplicate wins.  Returns the number of keys
 * that were new.  The caller guarantees room (load stays < 1) and no EMPTY key. */
int64_t embserve_hash_upsert(int64_t *keys, int32_t *locator, int64_t cap, const int64_t *ids, const int32_t *locs,
                             int64_t n) {
    const int64_t mask = cap - 1;
    const int shift = 64 - log2_cap(cap);
    int64_t added = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = ids[i];
        int64_t s = home_slot(key, shift);
        for (;;) {
            const int64_t k = keys[s];
            if (k == key) break;
            if (k == HASH_EMPTY) {
                keys[s] = key;
                added++;
                break;
            }
            s = (s + 1) & mask;
        }
        locator[s] = locs[i];
    }
    return added;
}

/* Delete ids; old_out[i] gets the locator it had (-1 = absent).  Returns how many were held.
 * Backward shift: after emptying slot `hole`, walk the cluster; an entry at j whose home slot
 * h is not cyclically in (hole, j] would be unreachable past the hole, so it moves into it. */
int64_t embserve_hash_delete(int64_t *keys, int32_t *locator, int64_t cap, const int64_t *ids, int64_t n,
                             int32_t *old_out) {
    const int64_t mask = cap - 1;
    const int shift = 64 - log2_cap(cap);
    int64_t removed = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = ids[i] == HASH_EMPTY ? -1 : find_slot(keys, mask, shift, ids[i]);
        if (s < 0) {
            old_out[i] = -1;
            continue;
        }
        old_out[i] = locator[s];
        removed++;
        int64_t hole = s, j = s;
        for (;;) {
            j = (j + 1) & mask;
            const int64_t k = keys[j];
            if (k == HASH_EMPTY) break;
            const int64_t h = home_slot(k, shift);
            /* distance from home to j vs from hole to j, cyclically */
            if (((j - h) & mask) >= ((j - hole) & mask)) {
                keys[hole] = k;
                locator[hole] = locator[j];
                hole = j;
            }
        }
        keys[hole] = HASH_EMPTY;
        locator[hole] = -1;
    }
    return removed;
}

/* Insert every entry of the old arrays into the new (empty, larger) ones, in slot order. */
void embserve_hash_rehash(const int64_t *old_keys, const int32_t *old_locator, int64_t old_cap, int64_t *keys,
                          int32_t *locator, int64_t cap) {
    const int64_t mask = cap - 1;
    const int shift = 64 - log2_cap(cap);
    for (int64_t i = 0; i < old_cap; i++) {
        const int64_t key = old_keys[i];
        if (key == HASH_EMPTY) continue;
        int64_t s = home_slot(key, shift);
        while (keys[s] != HASH_EMPTY) s = (s + 1) & mask;
        keys[s] = key;
        locator[s] = old_locator[i];
    }
}
