/* rng.c - the random state behind sampling and verification (pure: no llama.cpp). */
#include "pymoe.h"

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
