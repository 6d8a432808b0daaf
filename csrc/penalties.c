/* penalties.c - the logit changes that come before the sampling transforms:
 * logit_bias, then the repetition, presence and frequency penalties over the
 * last repeat_last_n tokens of the sequence (llama.cpp's order and formulas).
 *
 * A row is changed in place and put back afterwards (struct row_patch): the
 * changes touch a few dozen tokens, so a session's row and the loop's verify
 * rows are neither copied nor left changed (logprobs read the model's rows). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Whether a penalty is on: a window, and a penalty that changes something. */
static bool penalizes(const struct pymoe_sampling_params * p) {
    return p->repeat_last_n != 0 &&
           (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f);
}

bool pymoe_sampling_changes_logits(const struct pymoe_sampling_params * p) {
    return penalizes(p) || p->n_logit_bias > 0;
}

static int by_token(const void * a, const void * b) {
    const pymoe_token x = *(const pymoe_token *) a, y = *(const pymoe_token *) b;
    return (x > y) - (x < y);
}

/* Remember row[id] (once per change: put back in reverse order, the first saved value wins). */
static void save(struct pymoe_row_patch * patch, pymoe_token id) {
    patch->ids[patch->n] = id;
    patch->was[patch->n] = patch->row[id];
    patch->n += 1;
}

int32_t pymoe_row_patch(float * row, int32_t n_vocab, const struct pymoe_sampling_params * p, bool lenient,
                        const pymoe_token * a, int32_t n_a, const pymoe_token * b, int32_t n_b,
                        struct pymoe_row_patch * patch) {
    memset(patch, 0, sizeof(*patch));
    patch->row = row;
    /* the window: the last repeat_last_n tokens of a followed by b */
    int32_t window = !penalizes(p) ? 0 : p->repeat_last_n < 0 ? n_a + n_b
                                    : (p->repeat_last_n < n_a + n_b ? p->repeat_last_n : n_a + n_b);
    const size_t cap = (size_t) window + (size_t) p->n_logit_bias;
    if (cap == 0) {
        return PYMOE_OK;
    }
    patch->ids = malloc(cap * sizeof(*patch->ids) + cap * sizeof(*patch->was) + (size_t) window * sizeof(pymoe_token));
    if (!patch->ids) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    patch->was            = (float *) (patch->ids + cap);
    pymoe_token * tokens  = (pymoe_token *) (patch->was + cap);
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const pymoe_token id = p->logit_bias[i].token;
        if (lenient && (id < 0 || id >= n_vocab)) {
            continue;
        }
        if (id < 0 || id >= n_vocab) {
            pymoe_row_unpatch(patch);
            return pymoe_fail(PYMOE_ETOKEN, "logit_bias: token %d is outside the vocabulary [0, %d)", id, n_vocab);
        }
        save(patch, id);
        row[id] += p->logit_bias[i].bias;
    }
    const int32_t from_b = window < n_b ? window : n_b;
    if (window - from_b > 0) {
        memcpy(tokens, a + n_a - (window - from_b), sizeof(*tokens) * (size_t) (window - from_b));
    }
    if (from_b > 0) {
        memcpy(tokens + (window - from_b), b + n_b - from_b, sizeof(*tokens) * (size_t) from_b);
    }
    qsort(tokens, (size_t) window, sizeof(*tokens), by_token);
    for (int32_t i = 0; i < window;) {
        int32_t end = i + 1;
        while (end < window && tokens[end] == tokens[i]) {
            end++;
        }
        const pymoe_token id = tokens[i];
        if (id >= 0 && id < n_vocab) {
            save(patch, id);
            float x = row[id];
            x       = x <= 0.0f ? x * p->repeat_penalty : x / p->repeat_penalty;
            row[id] = x - (float) (end - i) * p->frequency_penalty - p->presence_penalty;
        }
        i = end;
    }
    return PYMOE_OK;
}

void pymoe_row_unpatch(struct pymoe_row_patch * patch) {
    for (int32_t i = patch->n - 1; i >= 0; i--) {
        patch->row[patch->ids[i]] = patch->was[i];
    }
    free(patch->ids);
    memset(patch, 0, sizeof(*patch));
}

int32_t pymoe_penalize(float * row, int32_t n_vocab, const struct pymoe_sampling_params * params,
                       const pymoe_token * history, int32_t n_history) {
    if (!row || n_vocab <= 0 || n_history < 0 || (n_history > 0 && !history)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_penalize: a row, n_vocab > 0 and the history are required");
    }
    struct pymoe_sampling_params local;
    int32_t                      rc = pymoe_sampling_params_in(params, &local, &params);
    struct pymoe_row_patch       patch;
    rc = rc == PYMOE_OK ? pymoe_row_patch(row, n_vocab, params, false, history, n_history, NULL, 0, &patch) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    free(patch.ids);  /* the changes stay: the row is the caller's */
    return pymoe_ok();
}
