/* Count-min sketch updates and estimates (compression/frequency.py: float32 decayed counts of
 * traffic; compression/lifecycle.py: int32 admission/eviction counts), the same results as the
 * torch code they replace, without its temporaries.
 *
 * Cells: [depth, width] row-major (float32 or int32).  Column of an ID in row r:
 *
 *     col = ((uint64) id * (uint64) mult[r] >> 33) % width
 *
 * which is torch's ((id * mult) >> 33) & 0x7FFFFFFF) % width on int64 (the product wraps the
 * same; the arithmetic shift's sign copies land above bit 30 and the mask drops them).
 *
 * Adds run in ID order within a row, as torch's index_add_ on a 1-D tensor does, so float sums
 * round identically; int32 cells wrap like torch's (computed in uint32, no signed overflow).
 * Per row, the columns of a block of IDs are computed first and their cells prefetched, then
 * added: the cells are tens of MB, and each add is a cache miss otherwise.
 */
#include <stdint.h>

#define BLOCK 64

static inline uint64_t column(int64_t id, int64_t mult, uint64_t width) {
    return (((uint64_t)id * (uint64_t)mult) >> 33) % width;
}

void embserve_cms_add_i32(int32_t *cells, int64_t depth, int64_t width, const int64_t *mult, const int64_t *ids, int64_t n) {
    uint64_t cols[BLOCK];
    for (int64_t r = 0; r < depth; r++) {
        uint32_t *row = (uint32_t *)cells + r * width;
        for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
            const int64_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
            for (int64_t i = 0; i < m; i++) {
                cols[i] = column(ids[i0 + i], mult[r], (uint64_t)width);
                __builtin_prefetch(row + cols[i], 1);
            }
            for (int64_t i = 0; i < m; i++) row[cols[i]] += 1u;
        }
    }
}

void embserve_cms_add_f32(float *cells, int64_t depth, int64_t width, const int64_t *mult, const int64_t *ids, int64_t n,
                          float weight) {
    uint64_t cols[BLOCK];
    for (int64_t r = 0; r < depth; r++) {
        float *row = cells + r * width;
        for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
            const int64_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
            for (int64_t i = 0; i < m; i++) {
                cols[i] = column(ids[i0 + i], mult[r], (uint64_t)width);
                __builtin_prefetch(row + cols[i], 1);
            }
            for (int64_t i = 0; i < m; i++) row[cols[i]] = row[cols[i]] + weight;
        }
    }
}

/* out[i] = min over rows of the ID's cell (torch.minimum keeps NaN; counts are never NaN) */
#define CMS_MIN(NAME, T)                                                                                                   \
    void NAME(const T *cells, int64_t depth, int64_t width, const int64_t *mult, const int64_t *ids, int64_t n, T *out) {    \
        uint64_t cols[BLOCK];                                                                                              \
        for (int64_t r = 0; r < depth; r++) {                                                                              \
            const T *row = cells + r * width;                                                                              \
            for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {                                                                    \
                const int64_t m = n - i0 < BLOCK ? n - i0 : BLOCK;                                                         \
                for (int64_t i = 0; i < m; i++) {                                                                          \
                    cols[i] = column(ids[i0 + i], mult[r], (uint64_t)width);                                               \
                    __builtin_prefetch(row + cols[i], 0);                                                                  \
                }                                                                                                          \
                for (int64_t i = 0; i < m; i++) {                                                                          \
                    const T v = row[cols[i]];                                                                              \
                    out[i0 + i] = (r == 0 || v < out[i0 + i]) ? v : out[i0 + i];                                           \
                }                                                                                                          \
            }                                                                                                              \
        }                                                                                                                  \
    }

CMS_MIN(embserve_cms_min_i32, int32_t)
CMS_MIN(embserve_cms_min_f32, float)
