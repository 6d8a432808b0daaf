/* rng.c - the random state behind sampling and verification, and the one
 * draw from weights they share (pure: no llama.cpp). */
#include "rng.h"

/* splitmix64: tiny, full-period, good enough to drive sampling. */
static uint64_t next_u64(uint64_t * state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void pymoe_rng_seed(uint64_t * state, uint64_t seed) {
    if (state) {
        *state = seed;
        (void) next_u64(state);  /* mix, so that seeds 0, 1, 2 start far apart */
    }
}

double pymoe_rng_uniform(uint64_t * state) {
    return (double) (next_u64(state) >> 11) * 0x1.0p-53;  /* 53 random bits -> [0, 1) */
}

int32_t pymoe_draw(const float * w, const float * minus, int32_t n, size_t stride, double u) {
    double total = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double x = minus ? (double) w[i * stride] - minus[i * stride] : w[i * stride];
        total += x > 0.0 ? x : 0.0;
    }
    if (!(total > 0.0)) {
        return -1;
    }
    double  target = u * total, cum = 0.0;
    int32_t last   = -1;
    for (int32_t i = 0; i < n; i++) {
        double x = minus ? (double) w[i * stride] - minus[i * stride] : w[i * stride];
        if (x > 0.0) {
            cum += x;
            last = i;
            if (target < cum) {
                return i;
            }
        }
    }
    return last;  /* rounding: u * total landed on the total */
}
