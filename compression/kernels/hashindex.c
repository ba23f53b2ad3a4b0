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
#include <stdlib.h>
#include <string.h>

#include "hashslot.h"

/* marker: this library takes any capacity (multiply-high home, compare wrap; hashslot.h) */
int embserve_hslot_any_capacity(void) { return 1; }

/* slot holding key, or -1 */
static inline int64_t find_slot(const uint8_t *slots, int64_t cap, int64_t key) {
    if (key == HSLOT_EMPTY) return -1;
    const int64_t s = hslot_stop(slots, cap, hslot_home(key, cap), key);
    return hslot_key(slots, s) == key ? s : -1;
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
        const int64_t s = hslot_stop(slots, cap, hslot_home(ids[i], cap), ids[i]);
        added += hslot_key(slots, s) == HSLOT_EMPTY;
        hslot_set(slots, s, ids[i], locs[i]);
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

/* ---- The static part (format 4; hashslot.h's mph_* and compression/hash_index.py) ----
 *
 * marker: this library has the static part (a library without it keeps keyed tables that have
 * one on the torch path: it would probe the overflow slots alone and miss most IDs) */
int embserve_mph_static_part(void) { return 1; }

#define MPH_PILOTS 65536 /* pilots are uint16 */

/* Build the static part over n unique keys (no EMPTY) and their locators: pilots[nb] and the
 * slots mslots[m] (all EMPTY on entry).  placed[i] = 1 for a key put in its static slot, 0 for
 * one whose bucket no pilot in [0, 65536) could seat (the caller puts those in the overflow).
 * Returns how many were placed, or -1 when out of memory.
 *
 * The search of PTHash / CHD: buckets in descending size, each trying pilots 0, 1, ... until all
 * its keys land on distinct free slots.  Large buckets go first, while most slots are free; a
 * bucket of one at the end needs about 1 / (1 - load) tries. */
int64_t embserve_mph_build(const int64_t *keys, const int32_t *locs, int64_t n, uint8_t *mslots, int64_t m, uint16_t *pilots,
                           int64_t nb, uint8_t *placed) {
    if (n == 0) {
        for (int64_t b = 0; b < nb; b++) pilots[b] = 0;
        return 0;
    }
    uint64_t *h = malloc(sizeof(uint64_t) * n);
    int64_t *start = calloc(nb + 1, sizeof(int64_t)), *members = malloc(sizeof(int64_t) * n);
    int64_t *order = malloc(sizeof(int64_t) * nb);
    uint64_t *taken = calloc((m + 63) / 64, sizeof(uint64_t));
    int64_t placed_count = -1;
    if (!h || !start || !members || !order || !taken) goto done;
    /* counting sort of the keys by bucket: members[start[b] .. start[b+1]) */
    for (int64_t i = 0; i < n; i++) {
        h[i] = hslot_mix((uint64_t)keys[i]);
        start[mph_bucket(h[i], nb) + 1]++;
    }
    int64_t largest = 0;
    for (int64_t b = 0; b < nb; b++) {
        if (start[b + 1] > largest) largest = start[b + 1];
        start[b + 1] += start[b];
    }
    {
        int64_t *fill = malloc(sizeof(int64_t) * (nb > largest + 1 ? nb : largest + 1));
        int64_t *pos = malloc(sizeof(int64_t) * (largest + 1));
        if (!fill || !pos) {
            free(fill);
            free(pos);
            goto done;
        }
        memcpy(fill, start, sizeof(int64_t) * nb);
        for (int64_t i = 0; i < n; i++) members[fill[mph_bucket(h[i], nb)]++] = i;
        /* buckets by descending size (counting sort on the size) */
        int64_t *by_size = calloc(largest + 2, sizeof(int64_t));
        if (!by_size) {
            free(fill);
            free(pos);
            goto done;
        }
        for (int64_t b = 0; b < nb; b++) by_size[largest - (start[b + 1] - start[b]) + 1]++;
        for (int64_t s = 0; s <= largest; s++) by_size[s + 1] += by_size[s];
        for (int64_t b = 0; b < nb; b++) order[by_size[largest - (start[b + 1] - start[b])]++] = b;
        free(by_size);
        placed_count = 0;
        for (int64_t o = 0; o < nb; o++) {
            const int64_t b = order[o], lo = start[b], size = start[b + 1] - lo;
            pilots[b] = 0;
            if (size == 0) continue;
            int found = 0;
            for (uint32_t p = 0; p < MPH_PILOTS && !found; p++) {
                const uint32_t pm = mph_pilot_mix(p);
                found = 1;
                for (int64_t j = 0; j < size && found; j++) {
                    const int64_t s = mph_pos(h[members[lo + j]], pm, m);
                    if (taken[s >> 6] >> (s & 63) & 1) found = 0;
                    for (int64_t q = 0; q < j && found; q++) found = pos[q] != s;
                    pos[j] = s;
                }
                if (found) pilots[b] = (uint16_t)p;
            }
            for (int64_t j = 0; j < size; j++) {
                const int64_t i = members[lo + j];
                placed[i] = (uint8_t)found;
                if (!found) continue;
                taken[pos[j] >> 6] |= 1ULL << (pos[j] & 63);
                hslot_set(mslots, pos[j], keys[i], locs[i]);
            }
            placed_count += found ? size : 0;
        }
        free(fill);
        free(pos);
    }
done:
    free(h);
    free(start);
    free(members);
    free(order);
    free(taken);
    return placed_count;
}

/* The whole index (static part + overflow slots) as the writes below take it. */
typedef struct {
    const uint16_t *pilots;
    int64_t nb;
    uint8_t *mslots;
    int64_t m; /* 0: no static part */
    uint8_t *slots;
    int64_t cap;
} hidx_t;

static inline int64_t static_slot(const hidx_t *x, int64_t key) { return x->m ? mph_slot(x->pilots, x->nb, x->m, key) : -1; }

/* whether key is held in its static slot s (-1: no static part) */
static inline int static_holds(const hidx_t *x, int64_t s, int64_t key) {
    return s >= 0 && key != HSLOT_EMPTY && hslot_key(x->mslots, s) == key;
}

/* locators of ids (-1 = absent): the static slot, then the overflow */
void embserve_hidx_find(const hidx_t *x, const int64_t *ids, int64_t n, int32_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = ids[i], s = static_slot(x, key);
        if (static_holds(x, s, key)) {
            out[i] = hslot_loc(x->mslots, s);
            continue;
        }
        const int64_t o = find_slot(x->slots, x->cap, key);
        out[i] = o >= 0 ? hslot_loc(x->slots, o) : -1;
    }
}

/* Upsert (ids[i] -> locs[i]) in order; a later duplicate wins.  A new key takes its static slot
 * when that slot is free (an ID the static part held and lost, or any other whose position falls
 * there), else an overflow slot.  added[0] / added[1]: new keys in the static part / overflow.
 * The caller guarantees overflow room for every key not yet held and no EMPTY key. */
void embserve_hidx_upsert(const hidx_t *x, const int64_t *ids, const int32_t *locs, int64_t n, int64_t *added) {
    added[0] = added[1] = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = ids[i], s = static_slot(x, key);
        if (static_holds(x, s, key)) {
            hslot_set_loc(x->mslots, s, locs[i]);
            continue;
        }
        const int64_t o = hslot_stop(x->slots, x->cap, hslot_home(key, x->cap), key); /* one probe: the key's slot or its free one */
        if (hslot_key(x->slots, o) == key) {
            hslot_set_loc(x->slots, o, locs[i]);
        } else if (s >= 0 && hslot_key(x->mslots, s) == HSLOT_EMPTY) {
            hslot_set(x->mslots, s, key, locs[i]);
            added[0]++;
        } else {
            hslot_set(x->slots, o, key, locs[i]);
            added[1]++;
        }
    }
}

/* Delete ids; old_out[i] gets the locator it had (-1 = absent).  removed[0] / removed[1]: how
 * many left the static part (their slot becomes free) / the overflow (backward shift). */
void embserve_hidx_delete(const hidx_t *x, const int64_t *ids, int64_t n, int32_t *old_out, int64_t *removed) {
    removed[0] = removed[1] = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = ids[i], s = static_slot(x, key);
        if (static_holds(x, s, key)) {
            old_out[i] = hslot_loc(x->mslots, s);
            hslot_set(x->mslots, s, HSLOT_EMPTY, -1);
            removed[0]++;
            continue;
        }
        removed[1] += embserve_hslot_delete(x->slots, x->cap, &ids[i], 1, &old_out[i]);
    }
}
