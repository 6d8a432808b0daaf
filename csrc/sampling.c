/* sampling.c - turn a logits row into a distribution and draw from it.
 *
 * Order (fixed, shared with speculative verification): top-k, top-p and
 * min-p choose which tokens stay, judged on softmax(logits); the temperature
 * then shapes the distribution over the tokens that stayed. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void pymoe_sampling_params_default(struct pymoe_sampling_params * params) {
    if (!params) {
        return;
    }
    params->temperature = 0.8f;
    params->top_k       = 40;
    params->top_p       = 0.95f;
    params->min_p       = 0.05f;
}

int32_t pymoe_check_sampling_params(const struct pymoe_sampling_params * p) {
    if (!p) {
        return pymoe_fail(PYMOE_EINVAL, "sampling params are NULL");
    }
    if (!(p->temperature >= 0.0f) || isinf(p->temperature)) {
        return pymoe_fail(PYMOE_EINVAL, "temperature must be finite and >= 0, got %g", p->temperature);
    }
    if (p->top_k < 0) {
        return pymoe_fail(PYMOE_EINVAL, "top_k must be >= 0 (0 = off), got %d", p->top_k);
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "top_p must be in (0, 1] (1 = off), got %g", p->top_p);
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "min_p must be in [0, 1] (0 = off), got %g", p->min_p);
    }
    return PYMOE_OK;
}

pymoe_token pymoe_argmax(const float * logits, int32_t n) {
    pymoe_token best = 0;
    for (int32_t i = 1; i < n; i++) {
        if (logits[i] > logits[best]) {  /* strict: ties go to the lowest id */
            best = i;
        }
    }
    return best;
}

/* Larger logit first; equal logits by lower id, so the order is total. */
static int by_logit_desc(const void * a, const void * b) {
    const pymoe_candidate * x = a;
    const pymoe_candidate * y = b;
    if (x->logit != y->logit) {
        return x->logit > y->logit ? -1 : 1;
    }
    return (x->id > y->id) - (x->id < y->id);
}

/* Sift-down for a min-heap on (logit, then higher id is smaller). */
static bool heap_less(const pymoe_candidate * a, const pymoe_candidate * b) {
    return by_logit_desc(a, b) > 0;
}

static void sift_down(pymoe_candidate * h, int32_t n, int32_t i) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_less(&h[l], &h[m])) m = l;
        if (r < n && heap_less(&h[r], &h[m])) m = r;
        if (m == i) return;
        pymoe_candidate t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Fill c with the k largest logits (k = n: all), sorted, largest first.
 * Returns how many candidates there are. */
static int32_t top_candidates(const float * logits, int32_t n, int32_t k, pymoe_candidate * c) {
    if (k <= 0 || k >= n) {
        for (int32_t i = 0; i < n; i++) {
            c[i] = (pymoe_candidate) { i, logits[i], 0.0f };
        }
        qsort(c, (size_t) n, sizeof(*c), by_logit_desc);
        return n;
    }
    for (int32_t i = 0; i < k; i++) {
        c[i] = (pymoe_candidate) { i, logits[i], 0.0f };
    }
    for (int32_t i = k / 2 - 1; i >= 0; i--) {
        sift_down(c, k, i);
    }
    for (int32_t i = k; i < n; i++) {
        pymoe_candidate x = { i, logits[i], 0.0f };
        if (heap_less(&c[0], &x)) {
            c[0] = x;
            sift_down(c, k, 0);
        }
    }
    qsort(c, (size_t) k, sizeof(*c), by_logit_desc);
    return k;
}

/* Apply the transforms; c[0..return) are the kept tokens with p summing to 1. */
static int32_t transform(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * p,
                         pymoe_candidate * c) {
    int32_t n = top_candidates(logits, n_vocab, p->top_k, c);
    /* softmax at temperature 1: what top-p and min-p judge */
    const float max = c[0].logit;
    double      sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf(c[i].logit - max);
        sum += c[i].p;
    }
    /* top-p: the shortest prefix (sorted) whose mass reaches top_p */
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int32_t i = 0; i < n; i++) {
            cum += c[i].p / sum;
            if (cum >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    /* min-p: relative to the most likely token, whose unnormalized p is 1 */
    if (p->min_p > 0.0f) {
        int32_t keep = 1;
        while (keep < n && c[keep].p >= p->min_p) {
            keep++;
        }
        n = keep;
    }
    /* temperature on the survivors */
    sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf((c[i].logit - max) / p->temperature);
        sum += c[i].p;
    }
    for (int32_t i = 0; i < n; i++) {
        c[i].p = (float) (c[i].p / sum);
    }
    return n;
}

/* A draw among the kept candidates (their p, read with the stride of the struct). */
static pymoe_token pick_candidate(const pymoe_candidate * c, int32_t n, double u) {
    _Static_assert(sizeof(pymoe_candidate) % sizeof(float) == 0, "candidates are a whole number of floats");
    int32_t i = pymoe_draw(&c[0].p, NULL, n, sizeof(pymoe_candidate) / sizeof(float), u);
    return c[i >= 0 ? i : 0].id;
}

int32_t pymoe_sample_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                          uint64_t * rng_state, pymoe_candidate * scratch, pymoe_token * out) {
    if (!logits || n_vocab <= 0 || !out) {
        return pymoe_fail(PYMOE_EINVAL, "sample: logits, n_vocab > 0 and out are required");
    }
    int32_t rc = pymoe_check_sampling_params(params);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (params->temperature == 0.0f) {
        *out = pymoe_argmax(logits, n_vocab);
        return pymoe_ok();
    }
    if (!rng_state) {
        return pymoe_fail(PYMOE_EINVAL, "sampling at temperature %g needs a random state", params->temperature);
    }
    int32_t n = transform(logits, n_vocab, params, scratch);
    *out      = pick_candidate(scratch, n, pymoe_rng_uniform(rng_state));
    return pymoe_ok();
}

int32_t pymoe_sample(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                     uint64_t * rng_state, pymoe_token * out) {
    if (params && params->temperature == 0.0f) {
        return pymoe_sample_with(logits, n_vocab, params, rng_state, NULL, out);
    }
    if (n_vocab <= 0) {
        return pymoe_fail(PYMOE_EINVAL, "sample: n_vocab must be > 0");
    }
    pymoe_candidate * scratch = malloc(sizeof(*scratch) * (size_t) n_vocab);
    if (!scratch) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t rc = pymoe_sample_with(logits, n_vocab, params, rng_state, scratch, out);
    free(scratch);
    return rc;
}

int32_t pymoe_probs_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                         pymoe_candidate * scratch, float * probs) {
    memset(probs, 0, sizeof(*probs) * (size_t) n_vocab);
    if (params->temperature == 0.0f) {
        probs[pymoe_argmax(logits, n_vocab)] = 1.0f;
        return 1;
    }
    int32_t n = transform(logits, n_vocab, params, scratch);
    for (int32_t i = 0; i < n; i++) {
        probs[scratch[i].id] = scratch[i].p;
    }
    return n;
}

int32_t pymoe_sampling_probs(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                             float * probs) {
    if (!logits || n_vocab <= 0 || !probs) {
        return pymoe_fail(PYMOE_EINVAL, "sampling_probs: logits, n_vocab > 0 and probs are required");
    }
    int32_t rc = pymoe_check_sampling_params(params);
    if (rc != PYMOE_OK) {
        return rc;
    }
    pymoe_candidate * c = malloc(sizeof(*c) * (size_t) n_vocab);
    if (!c) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    pymoe_probs_with(logits, n_vocab, params, c, probs);
    free(c);
    return pymoe_ok();
}

int32_t pymoe_sampling_pick(const float * probs, int32_t n_vocab, double u, pymoe_token * out) {
    if (!probs || n_vocab <= 0 || !out || !(u >= 0.0 && u < 1.0)) {
        return pymoe_fail(PYMOE_EINVAL, "sampling_pick: need probs, n_vocab > 0, out and u in [0, 1)");
    }
    for (int32_t i = 0; i < n_vocab; i++) {
        if (!(probs[i] >= 0.0f)) {
            return pymoe_fail(PYMOE_EINVAL, "probs[%d] = %g is not a probability", i, probs[i]);
        }
    }
    int32_t i = pymoe_draw(probs, NULL, n_vocab, 1, u);
    if (i < 0) {
        return pymoe_fail(PYMOE_EINVAL, "probs sum to 0: nothing to pick");
    }
    *out = i;
    return pymoe_ok();
}
