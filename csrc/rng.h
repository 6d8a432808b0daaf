/* rng.h - the random draw that sampling and verification share (internal; pure, no llama.cpp). */
#ifndef PYMOE_RNG_H
#define PYMOE_RNG_H

#include "pymoe.h"

#ifdef __cplusplus
extern "C" {  /* grammar.cpp */
#endif

/* Index i with probability proportional to max(0, w_i - minus_i) (minus
 * NULL: w_i), with u in [0, 1); element i of w (and minus) is at
 * [i * stride]. -1 when no weight is positive. Sums in double, so that the
 * draw depends on u only, not on float rounding order. */
int32_t pymoe_draw(const float * w, const float * minus, int32_t n, size_t stride, double u);

#ifdef __cplusplus
}
#endif

#endif
