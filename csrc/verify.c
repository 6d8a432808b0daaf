/* verify.c - the speculative verifier: which draft tokens to keep, and the
 * token after them. Pure: no llama.cpp, no globals but the error detail;
 * random numbers come in as arguments. */
#include "internal.h"

int32_t pymoe_verify(int32_t mode, const pymoe_token * draft, int32_t k, const float * q, const float * p,
                     int32_t n_vocab, const double * u, int32_t * n_accepted, pymoe_token * next) {
    if (!p || !n_accepted || !next || n_vocab <= 0 || k < 0 || (k > 0 && !draft)) {
        return pymoe_fail(PYMOE_EINVAL, "verify: need p, n_vocab > 0, k >= 0, the draft tokens and outputs");
    }
    if (mode != PYMOE_VERIFY_GREEDY && mode != PYMOE_VERIFY_STOCHASTIC) {
        return pymoe_fail(PYMOE_EINVAL, "verify: unknown mode %d", mode);
    }
    if (mode == PYMOE_VERIFY_STOCHASTIC && (!u || (k > 0 && !q))) {
        return pymoe_fail(PYMOE_EINVAL, "stochastic verification needs q rows and k + 1 uniforms");
    }
    for (int32_t i = 0; i < k; i++) {
        if (draft[i] < 0 || draft[i] >= n_vocab) {
            return pymoe_fail(PYMOE_ETOKEN, "draft token %d (at %d) is outside the vocabulary [0, %d)", draft[i], i,
                              n_vocab);
        }
    }
    if (mode == PYMOE_VERIFY_STOCHASTIC) {
        for (int32_t i = 0; i <= k; i++) {
            if (!(u[i] >= 0.0 && u[i] < 1.0)) {
                return pymoe_fail(PYMOE_EINVAL, "uniform %d is %g, not in [0, 1)", i, u[i]);
            }
        }
    }

    const size_t n = (size_t) n_vocab;
    if (mode == PYMOE_VERIFY_GREEDY) {
        int32_t i = 0;
        while (i < k && pymoe_argmax(p + i * n, n_vocab) == draft[i]) {
            i++;
        }
        *n_accepted = i;
        *next       = pymoe_argmax(p + i * n, n_vocab);
        return pymoe_ok();
    }

    for (int32_t i = 0; i < k; i++) {
        const float * pi = p + i * n;
        const float * qi = q + i * n;
        const pymoe_token d = draft[i];
        if (u[i] * qi[d] < pi[d]) {
            continue;  /* accepted with probability min(1, p/q) */
        }
        pymoe_token t = pymoe_draw(pi, qi, n_vocab, 1, u[k]);
        if (t < 0) {
            t = pymoe_draw(pi, NULL, n_vocab, 1, u[k]);  /* p <= q everywhere, so p == q */
        }
        if (t < 0) {
            return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", i);
        }
        *n_accepted = i;
        *next       = t;
        return pymoe_ok();
    }
    pymoe_token t = pymoe_draw(p + k * n, NULL, n_vocab, 1, u[k]);
    if (t < 0) {
        return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", k);
    }
    *n_accepted = k;
    *next       = t;
    return pymoe_ok();
}
