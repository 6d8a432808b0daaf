/* logprobs.c - what a row of logits says of a token: its log probability
 * (log softmax at temperature 1) and the most likely alternatives.
 *
 * One function for a plain session's last row and the speculative loop's
 * verify rows, so that both report the same numbers for the same row. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

int32_t pymoe_logprob_with(const float * logits, int32_t n_vocab, pymoe_token token, int32_t n_top,
                           pymoe_candidate * scratch, struct pymoe_logprob * out) {
    double  lse;
    int32_t rc = pymoe_log_sum_exp(logits, n_vocab, &lse);
    if (rc != PYMOE_OK) {
        return rc;
    }
    out->token   = token;
    out->logprob = (float) ((double) logits[token] - lse);
    out->n_top   = n_top < n_vocab ? n_top : n_vocab;
    if (out->n_top == n_vocab) {  /* the whole vocabulary: pymoe_top_candidates takes k < n */
        for (int32_t i = 0; i < n_vocab; i++) {
            scratch[i] = (pymoe_candidate) { i, logits[i], 0.0f };
        }
        for (int32_t i = 1; i < n_vocab; i++) {  /* insertion sort: at most PYMOE_MAX_TOP_LOGPROBS of them */
            pymoe_candidate c = scratch[i];
            int32_t         j = i;
            for (; j > 0 && scratch[j - 1].logit < c.logit; j--) {
                scratch[j] = scratch[j - 1];
            }
            scratch[j] = c;
        }
    } else if (out->n_top > 0) {
        rc = pymoe_top_candidates(logits, n_vocab, out->n_top, scratch);
        if (rc != PYMOE_OK) {
            return rc;
        }
    }
    for (int32_t i = 0; i < out->n_top; i++) {
        out->top_ids[i]      = scratch[i].id;
        out->top_logprobs[i] = (float) ((double) scratch[i].logit - lse);
    }
    return PYMOE_OK;
}

static int32_t check_request(int32_t n_vocab, pymoe_token token, int32_t n_top, const struct pymoe_logprob * out) {
    if (n_vocab <= 0 || !out) {
        return pymoe_fail(PYMOE_EINVAL, "logprob: n_vocab > 0 and out are required");
    }
    if (token < 0 || token >= n_vocab) {
        return pymoe_fail(PYMOE_ETOKEN, "logprob: token %d is outside the vocabulary [0, %d)", token, n_vocab);
    }
    if (n_top < 0 || n_top > PYMOE_MAX_TOP_LOGPROBS) {
        return pymoe_fail(PYMOE_EINVAL, "logprob: n_top must be in [0, %d], got %d", PYMOE_MAX_TOP_LOGPROBS, n_top);
    }
    return PYMOE_OK;
}

int32_t pymoe_logprob(const float * logits, int32_t n_vocab, pymoe_token token, int32_t n_top,
                      struct pymoe_logprob * out) {
    int32_t rc = logits ? check_request(n_vocab, token, n_top, out) : pymoe_fail(PYMOE_EINVAL, "logprob: no logits");
    if (rc != PYMOE_OK) {
        return rc;
    }
    pymoe_candidate * scratch = n_top > 0 ? malloc(PYMOE_SAMPLING_SCRATCH(n_vocab)) : NULL;
    if (n_top > 0 && !scratch) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    rc = pymoe_logprob_with(logits, n_vocab, token, n_top, scratch, out);
    free(scratch);
    return PYMOE_ROW_UNUSABLE(rc) ? pymoe_row_fail(rc, "the logits") : pymoe_ok();
}

int32_t pymoe_session_logprob(pymoe_session * s, pymoe_token token, int32_t n_top, struct pymoe_logprob * out) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_logprob: session is NULL");
    }
    int32_t rc = check_request(s->n_vocab, token, n_top, out);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (!s->logits) {
        return pymoe_fail(PYMOE_ESTATE, "no logits to score a token with: feed tokens first");
    }
    const float * last = s->logits + (size_t) (s->n_logit_rows - 1) * s->n_vocab;
    rc                 = pymoe_logprob_with(last, s->n_vocab, token, n_top, s->scratch, out);
    if (PYMOE_ROW_UNUSABLE(rc)) {
        char whose[64];
        snprintf(whose, sizeof whose, "the logits for position %d", s->pos);
        return pymoe_row_fail(rc, whose);
    }
    return pymoe_ok();
}
