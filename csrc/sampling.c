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

/* Fill c with the k largest logits (0 < k < n), sorted, largest first. */
static void top_candidates(const float * logits, int32_t n, int32_t k, pymoe_candidate * c) {
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
}

/* The softmax weights at temperature 1 (the most likely token weighs 1): what
 * top-p and min-p judge. Returns their sum. */
static double weigh(pymoe_candidate * c, int32_t n, float max) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf(c[i].logit - max);
        sum += c[i].p;
    }
    return sum;
}

/* top-p, then min-p, on candidates sorted most likely first: how many stay.
 * sum: the weight of every candidate top-k kept, sorted here or not. */
static int32_t cut_sorted(const pymoe_candidate * c, int32_t n, double sum, const struct pymoe_sampling_params * p) {
    /* top-p: the shortest prefix whose mass reaches top_p */
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
    /* min-p: relative to the most likely token, whose weight is 1 */
    if (p->min_p > 0.0f) {
        int32_t keep = 1;
        while (keep < n && c[keep].p >= p->min_p) {
            keep++;
        }
        n = keep;
    }
    return n;
}

enum { MASS_BINS = 160 };  /* binary exponents of float weights in (0, 1], subnormals included */

/* Without top-k, sorting the whole vocabulary was the cost (25 ms a row at
 * 152k tokens). What top-p and min-p keep is a prefix of the sorted order, and
 * so is every set {weight >= t}: sort only such a set, lowering t until the
 * cut is known to lie inside it. */
static int32_t cut_without_top_k(const float * logits, int32_t n, const struct pymoe_sampling_params * p,
                                 pymoe_candidate * c) {
    const pymoe_token top = pymoe_argmax(logits, n);
    for (int32_t i = 0; i < n; i++) {
        c[i] = (pymoe_candidate) { i, logits[i], 0.0f };
    }
    const double sum = weigh(c, n, logits[top]);
    if (p->top_p >= 1.0f && p->min_p <= 0.0f) {  /* every token stays: the most likely first, the rest unsorted */
        pymoe_candidate first = c[top];
        c[top]                = c[0];
        c[0]                  = first;
        return n;
    }
    /* where the top-p cut lies: weights (in (0, 1]) binned by binary exponent,
     * each bin's mass, summed from the top until it reaches top_p; then one
     * bin lower, a margin for rounding */
    float t = 0.0f;
    if (p->top_p < 1.0f) {
        double mass[MASS_BINS] = { 0.0 };
        for (int32_t i = 0; i < n; i++) {
            int e = 1;
            frexpf(c[i].p, &e);  /* c[i].p in [2^(e-1), 2^e) */
            mass[1 - e < MASS_BINS ? 1 - e : MASS_BINS - 1] += c[i].p;
        }
        double cum = 0.0;
        int    bin = 0;
        while (bin < MASS_BINS - 1 && (cum += mass[bin]) < p->top_p * sum) {
            bin++;
        }
        t = bin + 1 < MASS_BINS - 1 ? ldexpf(1.0f, -(bin + 1)) : 0.0f;
    }
    t = t > p->min_p ? t : p->min_p;  /* min-p keeps nothing below min_p anyway */
    for (;;) {
        int32_t m = 0;  /* move the candidates weighing >= t to the front */
        for (int32_t i = 0; i < n; i++) {
            if (c[i].p >= t) {
                pymoe_candidate x = c[i];
                c[i]              = c[m];
                c[m++]            = x;
            }
        }
        qsort(c, (size_t) m, sizeof(*c), by_logit_desc);
        const int32_t kept = cut_sorted(c, m, sum, p);
        /* inside: top-p cut it short, or the rest weigh less than min-p keeps, or there is no rest */
        if (kept < m || t <= p->min_p || m == n || t == 0.0f) {
            return kept;
        }
        t = t > 0x1p-120f ? t * 0x1p-8f : 0.0f;  /* not inside after all (rounding): look further */
    }
}

/* Apply the transforms; c[0..return) are the kept tokens with p summing to 1,
 * the most likely first (sorted, unless every token is kept). */
static int32_t transform(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * p,
                         pymoe_candidate * c) {
    int32_t n;
    if (p->top_k > 0 && p->top_k < n_vocab) {
        top_candidates(logits, n_vocab, p->top_k, c);
        n = cut_sorted(c, p->top_k, weigh(c, p->top_k, c[0].logit), p);
    } else {
        n = cut_without_top_k(logits, n_vocab, p, c);
    }
    /* temperature on the survivors */
    const float max = c[0].logit;
    double      sum = 0.0;
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
