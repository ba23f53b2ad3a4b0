/* Open-addressing hash index of a keyed table: the writes (upsert, delete, rehash) and a
 * serial find.  The lookup path probes the same slots inside decode.c's pipeline.
 *
 * Layout and home-slot formula: hashslot.h (12-byte slots: int64 key | int32 locator).
 *
 * Linear probing: slot, slot+1, ... (mod cap) until the key or an EMPTY slot.  Deletion shifts
 * the rest of the cluster back (Knuth's algorithm R), so there are no tombstones and a probe
 * for a missing key always ends at the first EMPTY slot.  The caller keeps the load below 1
 * (it grows the table geometrically before an insert would pass its maximum load), so every
 * probe ends.  Plain C, no Python API; called through ctypes with the GIL released.
 *
 * The functions are named embserve_hslot_*: the format-2 layout (separate key and locator
 * arrays, Fibonacci hash) had embserve_hash_*, and a library built before this change must not
 * be handed the new layout (compression/kernels/cpu_c.py looks for these names).  Likewise a
 * library built when capacities had to be powers of two (home = mix >> shift, wrap = mask)
 * would misplace keys in any other capacity: it lacks embserve_hslot_any_capacity, and cpu_c.py
 * then keeps the hash index (writes and lookups) on its torch path until it is rebuilt.
 */
#include <stdint.h>

#include "hashslot.h"

/* marker: this library takes any capacity (multiply-high home, compare wrap; hashslot.h) */
int embserve_hslot_any_capacity(void) { return 1; }

/* slot holding key, or -1 */
static inline int64_t find_slot(const uint8_t *slots, int64_t cap, int64_t key) {
    if (key == HSLOT_EMPTY) return -1;
    int64_t s = hslot_home(key, cap);
    for (;;) {
        const int64_t k = hslot_key(slots, s);
        if (k == key) return s;
        if (k == HSLOT_EMPTY) return -1;
        s = hslot_next(s, cap);
    }
}

/* locators of ids (-1 = absent) */
void embserve_hslot_find(const uint8_t *slots, int64_t cap, const int64_t *ids, int64_t n, int32_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = find_slot(slots, cap, ids[i]);
        out[i] = s >= 0 ? hslot_loc(slots, s) : -1;
    }
}

/* Upsert (ids[i] -> locs[i]) in order; a later duplicate wins.  Returns the number of keys
 * that were new.  The caller guarantees room (load stays < 1) and no EMPTY key. */
int64_t embserve_hslot_upsert(uint8_t *slots, int64_t cap, const int64_t *ids, const int32_t *locs, int64_t n) {
    int64_t added = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = ids[i];
        int64_t s = hslot_home(key, cap);
        for (;;) {
            const int64_t k = hslot_key(slots, s);
            if (k == key) break;
            if (k == HSLOT_EMPTY) {
                added++;
                break;
            }
            s = hslot_next(s, cap);
        }
        hslot_set(slots, s, key, locs[i]);
    }
    return added;
}

/* Delete ids; old_out[i] gets the locator it had (-1 = absent).  Returns how many were held.
 * Backward shift: after emptying slot `hole`, walk the cluster; an entry at j whose home slot
 * h is not cyclically in (hole, j] would be unreachable past the hole, so it moves into it. */
int64_t embserve_hslot_delete(uint8_t *slots, int64_t cap, const int64_t *ids, int64_t n, int32_t *old_out) {
    int64_t removed = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = find_slot(slots, cap, ids[i]);
        if (s < 0) {
            old_out[i] = -1;
            continue;
        }
        old_out[i] = hslot_loc(slots, s);
        removed++;
        int64_t hole = s, j = s;
        for (;;) {
            j = hslot_next(j, cap);
            const int64_t k = hslot_key(slots, j);
            if (k == HSLOT_EMPTY) break;
            const int64_t h = hslot_home(k, cap);
            /* distance from home to j vs from hole to j, cyclically */
            if (hslot_dist(h, j, cap) >= hslot_dist(hole, j, cap)) {
                hslot_set(slots, hole, k, hslot_loc(slots, j));
                hole = j;
            }
        }
        hslot_set(slots, hole, HSLOT_EMPTY, -1);
    }
    return removed;
}

/* Insert every entry of the old slots into the new (empty, larger) ones, in slot order. */
void embserve_hslot_rehash(const uint8_t *old_slots, int64_t old_cap, uint8_t *slots, int64_t cap) {
    for (int64_t i = 0; i < old_cap; i++) {
        const int64_t key = hslot_key(old_slots, i);
        if (key == HSLOT_EMPTY) continue;
        int64_t s = hslot_home(key, cap);
        while (hslot_key(slots, s) != HSLOT_EMPTY) s = hslot_next(s, cap);
        hslot_set(slots, s, key, hslot_loc(old_slots, i));
    }
}
