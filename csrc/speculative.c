/* speculative.c - the draft/verify loop over two sessions.
 *
 * The sequence is the prompt plus everything emitted. Invariants between rounds:
 *   target cache = sequence minus `last` (the newest token, not yet evaluated);
 *   draft cache  = sequence minus `pending` (a few tokens, ending with `last`).
 * A feed (the prompt, a later turn) is evaluated by both models at once. A
 * round feeds `pending` to the draft and drafts d_1..d_k, evaluates
 * [last, d_1..d_k] on the target in one batch, verifies, and drops what was
 * rejected from both caches. Rounds with k = 0 leave the draft alone; its
 * pending tokens are caught up in one batch when drafting resumes. */
#include "draft_length.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct pymoe_spec {
    pymoe_session *          target;
    pymoe_session *          draft;
    struct pymoe_spec_params params;
    bool                     greedy;
    int32_t                  n_vocab;       /* target's */
    int32_t                  n_common;      /* token ids both models know: the draft samples among these */
    uint64_t                 rng;
    bool                     has_last;
    pymoe_token              last;
    pymoe_token *            pending;
    int32_t                  n_pending, cap_pending;
    pymoe_token              batch[PYMOE_SPEC_MAX_DRAFT + 1];  /* [last, d_1..d_k] */
    float *                  q;             /* draft_max rows of n_vocab */
    float *                  p;             /* draft_max + 1 rows of n_vocab */
    pymoe_candidate *        scratch;       /* max(n_vocab, draft n_vocab) */
    double                   u[PYMOE_SPEC_MAX_DRAFT + 1];
    struct pymoe_spec_stats  stats;
    struct pymoe_draft_length chooser;
    pymoe_spec_inspect_fn    inspect;
    void *                   inspect_user_data;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

void pymoe_spec_params_default(struct pymoe_spec_params * params) {
    if (!params) {
        return;
    }
    memset(params, 0, sizeof(*params));
    params->draft_max = 4;
    pymoe_sampling_params_default(&params->sampling);
    params->sampling.temperature = 0.0f;
}

/* The draft must speak the target's tokenizer: the same token texts for every
 * id both have, the same BOS/EOS, and at most 128 ids of padding difference. */
static int32_t check_vocabularies(const pymoe_model * t, const pymoe_model * d) {
    const struct pymoe_model_info *ti = &t->info, *di = &d->info;
    int32_t diff = ti->n_vocab > di->n_vocab ? ti->n_vocab - di->n_vocab : di->n_vocab - ti->n_vocab;
    if (diff > 128) {
        return pymoe_fail(PYMOE_EINVAL,
                          "the draft's vocabulary (%d tokens) does not match the target's (%d tokens): "
                          "speculative decoding needs the same tokenizer",
                          di->n_vocab, ti->n_vocab);
    }
    if (ti->bos != di->bos || ti->eos != di->eos) {
        return pymoe_fail(PYMOE_EINVAL,
                          "the draft's special tokens (BOS %d, EOS %d) differ from the target's (BOS %d, EOS %d); "
                          "vocabularies: draft %d tokens, target %d tokens",
                          di->bos, di->eos, ti->bos, ti->eos, di->n_vocab, ti->n_vocab);
    }
    if (ti->vocab_fingerprint == di->vocab_fingerprint) {
        return PYMOE_OK;
    }
    int32_t n = ti->n_vocab < di->n_vocab ? ti->n_vocab : di->n_vocab;
    for (int32_t i = 0; i < n; i++) {
        const char * a = llama_vocab_get_text(t->vocab, i);
        const char * b = llama_vocab_get_text(d->vocab, i);
        if (strcmp(a ? a : "", b ? b : "") != 0) {
            return pymoe_fail(PYMOE_EINVAL,
                              "the draft's token %d is '%s' but the target's is '%s' (draft %d tokens, target %d "
                              "tokens): speculative decoding needs the same tokenizer",
                              i, b ? b : "", a ? a : "", di->n_vocab, ti->n_vocab);
        }
    }
    return PYMOE_OK;
}

int32_t pymoe_spec_create(pymoe_session * target, pymoe_session * draft, const struct pymoe_spec_params * params,
                          pymoe_spec ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: out is NULL");
    }
    *out = NULL;
    if (!target || !draft || !params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: target, draft and params are required");
    }
    if (target == draft) {
        return pymoe_fail(PYMOE_EINVAL, "target and draft must be two sessions (they may share a model)");
    }
    if (params->draft_max < 0 || params->draft_max > PYMOE_SPEC_MAX_DRAFT) {
        return pymoe_fail(PYMOE_EINVAL, "draft_max must be in [0, %d], got %d", PYMOE_SPEC_MAX_DRAFT,
                          params->draft_max);
    }
    if (!(params->p_min >= 0.0f && params->p_min <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "p_min must be in [0, 1], got %g", params->p_min);
    }
    int32_t rc = pymoe_check_sampling_params(&params->sampling);
    if (rc != PYMOE_OK) {
        return rc;
    }
    const pymoe_model *tm = target->model, *dm = draft->model;
    if (tm->info.is_recurrent || tm->info.is_hybrid || dm->info.is_recurrent || dm->info.is_hybrid) {
        return pymoe_fail(PYMOE_EUNSUPPORTED,
                          "speculative decoding of recurrent or hybrid models (%s / %s) needs state rollback, "
                          "which pymoe does not do yet",
                          tm->info.arch, dm->info.arch);
    }
    if (target->pos != 0 || draft->pos != 0) {
        return pymoe_fail(PYMOE_ESTATE, "both sessions must be empty (positions %d and %d); reset them first",
                          target->pos, draft->pos);
    }
    rc = check_vocabularies(tm, dm);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct pymoe_spec * s = calloc(1, sizeof(*s));
    if (!s) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    s->target   = target;
    s->draft    = draft;
    s->params   = *params;
    s->greedy   = params->sampling.temperature == 0.0f;
    s->n_vocab  = target->n_vocab;
    s->n_common = target->n_vocab < draft->n_vocab ? target->n_vocab : draft->n_vocab;
    size_t rows = (size_t) params->draft_max + 1;
    size_t wide = (size_t) (target->n_vocab > draft->n_vocab ? target->n_vocab : draft->n_vocab);
    s->cap_pending = 64;
    s->pending     = malloc(sizeof(*s->pending) * (size_t) s->cap_pending);
    s->scratch     = malloc(sizeof(*s->scratch) * wide);
    if (!s->greedy) {
        s->q = malloc(sizeof(float) * rows * (size_t) s->n_vocab);
        s->p = malloc(sizeof(float) * rows * (size_t) s->n_vocab);
    }
    if (!s->pending || !s->scratch || (!s->greedy && (!s->q || !s->p))) {
        pymoe_spec_free(s);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    pymoe_rng_seed(&s->rng, params->seed);
    pymoe_draft_length_init(&s->chooser, params->draft_max);
    *out = s;
    return pymoe_ok();
}

void pymoe_spec_free(pymoe_spec * s) {
    if (!s) {
        return;
    }
    free(s->pending);
    free(s->scratch);
    free(s->q);
    free(s->p);
    free(s);
}

static int32_t add_pending(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    if (s->n_pending + n > s->cap_pending) {
        int32_t cap = s->cap_pending;
        while (cap < s->n_pending + n) {
            cap *= 2;
        }
        pymoe_token * grown = realloc(s->pending, sizeof(*grown) * (size_t) cap);
        if (!grown) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        s->pending     = grown;
        s->cap_pending = cap;
    }
    memcpy(s->pending + s->n_pending, tokens, sizeof(*tokens) * (size_t) n);
    s->n_pending += n;
    return PYMOE_OK;
}

int32_t pymoe_spec_feed(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    if (!s || !tokens || n <= 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_feed: need the loop and at least one token");
    }
    int32_t rc = pymoe_check_tokens(s->target->model, tokens, n);
    if (rc == PYMOE_OK) {
        rc = pymoe_check_tokens(s->draft->model, tokens, n);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    /* the target evaluates [last] + tokens[:-1]; tokens[-1] waits */
    int32_t t_need = s->target->pos + (s->has_last ? 1 : 0) + n;
    int32_t d_need = s->draft->pos + s->n_pending + n;
    if (t_need > s->target->n_ctx || d_need > s->draft->n_ctx) {
        return pymoe_fail(PYMOE_ECONTEXT,
                          "%d tokens do not fit: the sequence would need %d positions of the target's %d and %d of "
                          "the draft's %d",
                          n, t_need, s->target->n_ctx, d_need, s->draft->n_ctx);
    }
    /* pending ends with last, so after appending the tokens the target's
     * input [last] + tokens[:-1] is the n pending tokens from there */
    const int32_t from = s->has_last ? s->n_pending - 1 : s->n_pending;
    rc = add_pending(s, tokens, n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    /* both models evaluate the input now (prefill), so that the first round
     * costs what every round costs */
    const int32_t t_start = s->target->pos, d_start = s->draft->pos;
    const int32_t t_n     = s->n_pending - 1 - from;
    if (t_n > 0) {
        rc = pymoe_session_feed(s->target, s->pending + from, t_n, false);
    }
    if (rc == PYMOE_OK && s->n_pending > 1) {
        rc = pymoe_session_feed(s->draft, s->pending, s->n_pending - 1, false);
    }
    if (rc != PYMOE_OK) {
        s->n_pending -= n;
        if (s->target->pos > t_start) {
            pymoe_session_rewind(s->target, s->target->pos - t_start);
        }
        if (s->draft->pos > d_start) {
            pymoe_session_rewind(s->draft, s->draft->pos - d_start);
        }
        return rc;
    }
    s->pending[0] = tokens[n - 1];
    s->n_pending  = 1;
    s->last       = tokens[n - 1];
    s->has_last   = true;
    return pymoe_ok();
}

/* Largest probability of softmax(row): what p_min is compared with in greedy mode. */
static float top_probability(const float * row, int32_t n, pymoe_token top) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += exp((double) row[i] - row[top]);
    }
    return (float) (1.0 / sum);
}

/* The last logits row of a session that was just fed. */
static const float * last_row(const pymoe_session * s) {
    return s->logits + (size_t) (s->n_logit_rows - 1) * s->n_vocab;
}

/* Draft up to k tokens into s->batch[1..]; returns how many were drafted or a
 * negative status. *in_cache: how many of them the draft has evaluated; cost
 * receives the catch-up size and the acceptance tests read from it. */
static int32_t run_draft(pymoe_spec * s, int32_t k, int32_t * in_cache, struct pymoe_round_cost * cost) {
    *in_cache            = 0;
    cost->catchup_tokens = s->n_pending;
    /* Greedy mode: every pending token after the first was the target's
     * choice, so where the draft's argmax matched it the draft would have been
     * accepted. Reading those rows gives the chooser acceptance tests for free
     * after plain rounds (auto k would otherwise learn only from drafting). */
    const bool learn = s->greedy && s->params.auto_draft && s->n_pending > 1 && s->n_pending <= s->draft->n_batch;
    int32_t    rc    = pymoe_session_feed(s->draft, s->pending, s->n_pending, learn);
    if (rc != PYMOE_OK) {
        return rc;
    }
    for (int32_t i = 0; learn && i + 1 < s->n_pending; i++) {
        const float * row = s->draft->logits + (size_t) i * s->draft->n_vocab;
        cost->extra_tests += 1;
        cost->extra_passed += pymoe_argmax(row, s->n_common) == s->pending[i + 1];
    }
    s->n_pending = 0;
    const size_t V = (size_t) s->n_vocab;
    for (int32_t i = 0; i < k; i++) {
        const float * row = last_row(s->draft);
        pymoe_token   d;
        float         top;
        if (s->greedy) {
            d   = pymoe_argmax(row, s->n_common);
            top = s->params.p_min > 0.0f ? top_probability(row, s->n_common, d) : 1.0f;
        } else {
            float * q = s->q + i * V;
            pymoe_probs_with(row, s->n_common, &s->params.sampling, s->scratch, q);
            memset(q + s->n_common, 0, sizeof(float) * (V - (size_t) s->n_common));
            top = s->scratch[0].p;  /* candidates are sorted, most likely first */
            rc  = pymoe_sampling_pick(q, s->n_common, pymoe_rng_uniform(&s->rng), &d);
            if (rc != PYMOE_OK) {
                return rc;
            }
        }
        if (top < s->params.p_min) {
            return i;  /* the draft is unsure: stop here */
        }
        s->batch[1 + i] = d;
        if (i + 1 < k) {
            rc = pymoe_session_feed(s->draft, &d, 1, false);
            if (rc != PYMOE_OK) {
                return rc;
            }
            *in_cache = i + 1;
        }
    }
    return k;
}

static int32_t choose_k(pymoe_spec * s, int32_t max_tokens) {
    int32_t k = s->params.auto_draft ? pymoe_draft_length_choose(&s->chooser) : s->params.draft_max;
    /* no more drafts than tokens wanted, or positions left in either context */
    int32_t t_room = s->target->n_ctx - s->target->pos - 1;
    int32_t d_room = s->draft->n_ctx - s->draft->pos - s->n_pending + 1;
    if (k > max_tokens - 1) k = max_tokens - 1;
    if (k > t_room) k = t_room;
    if (k > d_room) k = d_room;
    return k < 0 ? 0 : k;
}

int32_t pymoe_spec_step(pymoe_spec * s, int32_t max_tokens, pymoe_token * out, int32_t capacity, int32_t * n_out,
                        int32_t * stop) {
    if (!s || !out || !n_out || !stop) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_step: NULL argument");
    }
    *n_out = 0;
    *stop  = PYMOE_STOP_NONE;
    if (capacity < s->params.draft_max + 1) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_step: capacity %d < draft_max + 1 = %d", capacity,
                          s->params.draft_max + 1);
    }
    if (!s->has_last) {
        return pymoe_fail(PYMOE_ESTATE, "feed a prompt first");
    }
    if (max_tokens <= 0) {
        *stop = PYMOE_STOP_MAX_TOKENS;
        return pymoe_ok();
    }
    if (s->target->pos >= s->target->n_ctx) {
        *stop = PYMOE_STOP_CONTEXT_FULL;
        return pymoe_ok();
    }
    const size_t V  = (size_t) s->n_vocab;
    const double t0 = now();

    int32_t                 k = choose_k(s, max_tokens), n_draft = 0, in_cache = 0, rc;
    struct pymoe_round_cost cost = { 0 };
    if (k > 0) {
        n_draft = run_draft(s, k, &in_cache, &cost);
        if (n_draft < 0) {
            return n_draft;
        }
    }
    const double t1 = now();

    s->batch[0] = s->last;
    rc = pymoe_session_feed(s->target, s->batch, n_draft + 1, true);
    if (rc != PYMOE_OK) {
        return rc;
    }
    const double  t2     = now();
    const float * logits = s->target->logits;

    int32_t     n_acc;
    pymoe_token next;
    if (s->greedy) {
        rc = pymoe_verify(PYMOE_VERIFY_GREEDY, s->batch + 1, n_draft, NULL, logits, s->n_vocab, NULL, &n_acc, &next);
    } else {
        for (int32_t i = 0; i <= n_draft; i++) {
            pymoe_probs_with(logits + i * V, s->n_vocab, &s->params.sampling, s->scratch, s->p + i * V);
            s->u[i] = pymoe_rng_uniform(&s->rng);
        }
        rc = pymoe_verify(PYMOE_VERIFY_STOCHASTIC, s->batch + 1, n_draft, s->q, s->p, s->n_vocab, s->u, &n_acc,
                          &next);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (s->inspect) {
        struct pymoe_spec_round round = { s->batch + 1, n_draft, logits, s->n_vocab, n_acc, next };
        s->inspect(&round, s->inspect_user_data);
    }
    /* an accepted end-of-generation token ends the sequence there */
    for (int32_t i = 0; i < n_acc; i++) {
        if (pymoe_model_token_is_eog(s->target->model, s->batch[1 + i])) {
            next  = s->batch[1 + i];
            n_acc = i;
            break;
        }
    }

    /* drop the rejected drafts from both caches */
    rc = pymoe_session_rewind(s->target, n_draft - n_acc);
    int32_t keep = n_acc < in_cache ? n_acc : in_cache;
    if (rc == PYMOE_OK && k > 0) {
        rc = pymoe_session_rewind(s->draft, in_cache - keep);
    }
    if (rc == PYMOE_OK) {
        rc = add_pending(s, s->batch + 1 + keep, n_acc - keep);  /* accepted but never fed to the draft */
    }
    if (rc == PYMOE_OK) {
        rc = add_pending(s, &next, 1);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->last = next;

    memcpy(out, s->batch + 1, sizeof(*out) * (size_t) n_acc);
    *n_out = n_acc;
    if (pymoe_model_token_is_eog(s->target->model, next)) {
        *stop = PYMOE_STOP_EOG;
    } else {
        out[(*n_out)++] = next;
        if (*n_out >= max_tokens) {
            *stop = PYMOE_STOP_MAX_TOKENS;
        } else if (s->target->pos >= s->target->n_ctx) {
            *stop = PYMOE_STOP_CONTEXT_FULL;
        }
    }

    const double t3 = now();
    struct pymoe_spec_stats * st = &s->stats;
    st->rounds += 1;
    st->drafted += n_draft;
    st->accepted += n_acc;
    st->emitted += *n_out;
    st->accepted_hist[n_acc] += 1;
    st->draft_seconds += t1 - t0;
    st->verify_seconds += t2 - t1;
    st->other_seconds += t3 - t2;
    st->verify_seconds_by_n[n_draft + 1] += t2 - t1;
    st->verify_count_by_n[n_draft + 1] += 1;
    st->rounds_by_k[k] += 1;
    st->last_k = k;
    cost.n_draft        = n_draft;
    cost.n_accepted     = n_acc;
    cost.draft_tokens   = k > 0 ? cost.catchup_tokens + in_cache : 0;
    cost.draft_seconds  = t1 - t0;
    cost.verify_seconds = t2 - t1;
    cost.other_seconds  = t3 - t2;
    pymoe_draft_length_update(&s->chooser, &cost);
    st->acceptance_estimate = pymoe_draft_length_acceptance(&s->chooser);
    return pymoe_ok();
}

int32_t pymoe_spec_run(pymoe_spec * s, int32_t max_tokens, pymoe_token_fn on_token, void * user_data,
                       int32_t * n_out, int32_t * stop) {
    if (!s || !n_out || !stop) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_run: NULL argument");
    }
    *n_out = 0;
    *stop  = PYMOE_STOP_NONE;
    pymoe_token round[PYMOE_SPEC_MAX_DRAFT + 1];
    while (*stop == PYMOE_STOP_NONE) {
        int32_t n  = 0;
        int32_t rc = pymoe_spec_step(s, max_tokens - *n_out, round, PYMOE_SPEC_MAX_DRAFT + 1, &n, stop);
        if (rc != PYMOE_OK) {
            return rc;
        }
        bool go_on = true;
        for (int32_t i = 0; i < n; i++) {
            go_on = (!on_token || on_token(round[i], user_data)) && go_on;
        }
        *n_out += n;
        if (!go_on && *stop == PYMOE_STOP_NONE) {
            *stop = PYMOE_STOP_CALLBACK;
        }
    }
    return pymoe_ok();
}

int32_t pymoe_spec_stats(const pymoe_spec * s, struct pymoe_spec_stats * out) {
    if (!s || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_stats: NULL argument");
    }
    *out = s->stats;
    return pymoe_ok();
}

void pymoe_spec_set_inspect(pymoe_spec * s, pymoe_spec_inspect_fn fn, void * user_data) {
    if (s) {
        s->inspect           = fn;
        s->inspect_user_data = user_data;
    }
}
