/* speculative.c - the draft/verify loop: a target session, and drafts from a
 * draft session or the target's own MTP head (mtp.c), from the context
 * (lookup), or both.
 *
 * The sequence is the prompt plus everything emitted. Invariants between rounds:
 *   target cache = sequence minus `t_pending` (usually just the newest token;
 *                  more after a checkpoint restore: the tokens to evaluate again);
 *   draft cache  = sequence minus `pending` (a few tokens, ending with the newest).
 * (Without a draft model only the target's invariant holds; the lookup index
 * holds the whole sequence; an MTP head holds it but for the tokens waiting
 * in its queue.)
 * A feed (the prompt, a later turn) is evaluated by both models at once. A
 * round either copies d_1..d_k from the context (lookup: a match was found
 * and is long enough to pay), or feeds `pending` to the draft and drafts
 * d_1..d_k; it evaluates
 * [t_pending, d_1..d_k] on the target in one batch, verifies, and drops what
 * was rejected from both caches: by removing positions (KV cache), by a
 * recurrent-state snapshot, or by restoring the checkpoint saved before the
 * batch (recurrent state; see enum pymoe_rollback). Rounds with k = 0 leave
 * the draft alone; its pending tokens are caught up in one batch when
 * drafting resumes. pymoe_spec_step reads as the round's four steps: draft,
 * verify, roll back, account; each cache is checked against the sequence
 * after every feed and round (check_in_step). */
#include "draft_length.h"
#include "internal.h"
#include "ngram.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A sampling distribution as the tokens it keeps, ids ascending: what the
 * verifier reads, instead of a full-vocabulary row per draft token. */
struct dist_row {
    pymoe_token * ids;
    float *       p;
    int32_t       n, cap;
};

struct pymoe_spec {
    pymoe_session *          target;
    pymoe_session *          draft;         /* NULL: no draft model */
    struct pymoe_mtp *       mtp;           /* NULL: no MTP drafts; the target session's */
    struct pymoe_ngram       lookup;        /* the sequence and its n-grams, when lookup drafts are on */
    bool                     use_lookup;
    bool                     copying;       /* the last round's lookup drafts were all accepted */
    struct pymoe_spec_params params;
    bool                     greedy;
    bool                     broken;        /* a failure left the caches out of step with the sequence */
    int32_t                  n_vocab;       /* target's */
    int32_t                  n_common;      /* token ids both models know: the draft samples among these */
    int32_t                  t_method;      /* enum pymoe_rollback, resolved */
    int32_t                  d_method;
    uint64_t                 rng;
    int32_t                  n_seq;         /* tokens in the sequence */
    int32_t                  batch_cap;     /* largest verify batch: below llama.cpp's op-offload batch */
    pymoe_token              t_pending[PYMOE_SPEC_MAX_BATCH];
    int32_t                  n_t_pending;
    pymoe_token *            pending;
    int32_t                  n_pending, cap_pending;
    pymoe_token              batch[PYMOE_SPEC_MAX_BATCH];  /* [t_pending, d_1..d_k] */
    struct dist_row          q[PYMOE_SPEC_MAX_DRAFT];      /* the draft's distributions, kept tokens only */
    struct dist_row          p[PYMOE_SPEC_MAX_DRAFT + 1];  /* the target's */
    pymoe_candidate *        scratch;       /* sampling scratch for max(n_vocab, draft n_vocab) */
    double                   u[PYMOE_SPEC_MAX_DRAFT + 1];
    struct pymoe_spec_stats  stats;
    struct pymoe_draft_length chooser;
    pymoe_spec_inspect_fn    inspect;
    void *                   inspect_user_data;
};

void pymoe_spec_params_default(struct pymoe_spec_params * params) {
    if (!params) {
        return;
    }
    memset(params, 0, sizeof(*params));
    params->draft_max = 4;
    pymoe_sampling_params_default(&params->sampling);  /* sampled, as a session samples */
    params->rollback = PYMOE_ROLLBACK_AUTO;
    params->draft_sources = PYMOE_DRAFT_MODEL;
    params->ngram_min     = 2;
    params->ngram_max     = 12;
}

static const char * method_name(int32_t m) {
    switch (m) {
        case PYMOE_ROLLBACK_REMOVE:     return "remove";
        case PYMOE_ROLLBACK_SNAPSHOT:   return "snapshot";
        case PYMOE_ROLLBACK_CHECKPOINT: return "checkpoint";
        default:                        return "auto";
    }
}

/* The cheapest rollback a session supports, or the one asked for if it can. */
static int32_t resolve_rollback(const pymoe_session * s, int32_t asked, const char * which, int32_t * out) {
    int32_t best = !s->recurrent ? PYMOE_ROLLBACK_REMOVE
                 : s->n_rs_seq > 0 ? PYMOE_ROLLBACK_SNAPSHOT : PYMOE_ROLLBACK_CHECKPOINT;
    if (asked == PYMOE_ROLLBACK_AUTO || asked == best) {
        *out = best;
        return PYMOE_OK;
    }
    bool ok = s->recurrent ? asked == PYMOE_ROLLBACK_CHECKPOINT : false;
    if (!ok) {
        const char * why = asked == PYMOE_ROLLBACK_REMOVE ? "its recurrent state cannot drop positions"
                         : asked == PYMOE_ROLLBACK_SNAPSHOT && s->recurrent
                             ? "its session has no recurrent-state snapshots (n_rs_seq 0, or an architecture "
                               "llama.cpp keeps none for)"
                             : "it has a KV cache only, which drops positions directly";
        return pymoe_fail(PYMOE_EINVAL, "the %s (%s) cannot roll back by %s: %s", which, s->model->info.arch,
                          method_name(asked), why);
    }
    *out = asked;
    return PYMOE_OK;
}

/* PYMOE_SPEC_MAX_BATCH, or less when GGML_OP_OFFLOAD_MIN_BATCH (which ggml
 * reads from the same environment) makes llama.cpp offload smaller batches;
 * never below one draft token. */
static int32_t verify_batch_cap(void) {
    const char * env = getenv("GGML_OP_OFFLOAD_MIN_BATCH");
    const long   min = env ? strtol(env, NULL, 10) : 0;
    if (min <= 0 || min > PYMOE_SPEC_MAX_BATCH) {
        return PYMOE_SPEC_MAX_BATCH;
    }
    return min - 1 < 2 ? 2 : (int32_t) min - 1;
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

/* The draft sources asked for, against the sessions given. */
static int32_t check_sources(const pymoe_session * target, const pymoe_session * draft,
                             const struct pymoe_spec_params * params) {
    const int32_t sources = params->draft_sources;
    if (sources <= 0 || (sources & ~(PYMOE_DRAFT_MODEL | PYMOE_DRAFT_LOOKUP | PYMOE_DRAFT_MTP)) != 0 ||
        (sources & PYMOE_DRAFT_MODEL && sources & PYMOE_DRAFT_MTP)) {
        return pymoe_fail(PYMOE_EINVAL, "draft_sources must be PYMOE_DRAFT_MODEL (1) or PYMOE_DRAFT_MTP (4), "
                          "PYMOE_DRAFT_LOOKUP (2), or lookup with one of the others, got %d", sources);
    }
    if ((sources & PYMOE_DRAFT_MODEL) && !draft) {
        return pymoe_fail(PYMOE_EINVAL, "draft_sources includes a draft model but no draft session was given");
    }
    if (!(sources & PYMOE_DRAFT_MODEL) && draft) {
        return pymoe_fail(PYMOE_EINVAL, "a draft session was given but draft_sources does not include "
                          "PYMOE_DRAFT_MODEL");
    }
    if (target == draft) {
        return pymoe_fail(PYMOE_EINVAL, "target and draft must be two sessions (they may share a model)");
    }
    if ((sources & PYMOE_DRAFT_LOOKUP) &&
        !(params->ngram_min >= 1 && params->ngram_min <= params->ngram_max && params->ngram_max <= PYMOE_NGRAM_MAX)) {
        return pymoe_fail(PYMOE_EINVAL, "lookup drafts need 1 <= ngram_min <= ngram_max <= %d, got ngram_min %d, "
                          "ngram_max %d", PYMOE_NGRAM_MAX, params->ngram_min, params->ngram_max);
    }
    return PYMOE_OK;
}

int32_t pymoe_spec_create(pymoe_session * target, pymoe_session * draft, const struct pymoe_spec_params * params,
                          pymoe_spec ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: out is NULL");
    }
    *out = NULL;
    if (!target || !params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: target and params are required");
    }
    int32_t rc = check_sources(target, draft, params);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (params->draft_max < 0 || params->draft_max > PYMOE_SPEC_MAX_DRAFT) {
        return pymoe_fail(PYMOE_EINVAL, "draft_max must be in [0, %d], got %d", PYMOE_SPEC_MAX_DRAFT,
                          params->draft_max);
    }
    if (!(params->draft_p_min >= 0.0f && params->draft_p_min <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "draft_p_min must be in [0, 1], got %g", params->draft_p_min);
    }
    rc = pymoe_check_sampling_params(&params->sampling);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (params->rollback < PYMOE_ROLLBACK_AUTO || params->rollback > PYMOE_ROLLBACK_CHECKPOINT) {
        return pymoe_fail(PYMOE_EINVAL, "rollback must be 0 (auto), 1 (remove), 2 (snapshot) or 3 (checkpoint), got %d",
                          params->rollback);
    }
    int32_t t_method, d_method = PYMOE_ROLLBACK_REMOVE;
    rc = resolve_rollback(target, params->rollback, "target", &t_method);
    if (rc == PYMOE_OK && draft) {  /* the draft feeds one token per batch: snapshots never cover its drafts */
        rc = resolve_rollback(draft, draft->recurrent ? PYMOE_ROLLBACK_CHECKPOINT : PYMOE_ROLLBACK_AUTO, "draft",
                              &d_method);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (target->pos != 0 || (draft && draft->pos != 0)) {
        return pymoe_fail(PYMOE_ESTATE, "the sessions must be empty (target position %d, draft %d); reset them first",
                          target->pos, draft ? draft->pos : 0);
    }
    rc = draft ? check_vocabularies(target->model, draft->model) : PYMOE_OK;
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct pymoe_spec * s = calloc(1, sizeof(*s));
    if (!s) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    s->target   = target;
    s->draft    = draft;
    s->t_method = t_method;
    s->d_method = d_method;
    s->stats.rollback_target = t_method;
    s->stats.rollback_draft  = d_method;
    s->params   = *params;
    s->greedy   = params->sampling.temperature == 0.0f;
    s->n_vocab  = target->n_vocab;
    s->n_common = draft && draft->n_vocab < target->n_vocab ? draft->n_vocab : target->n_vocab;
    size_t wide = (size_t) (draft && draft->n_vocab > target->n_vocab ? draft->n_vocab : target->n_vocab);
    s->cap_pending = 64;
    s->pending     = malloc(sizeof(*s->pending) * (size_t) s->cap_pending);
    s->scratch     = malloc(PYMOE_SAMPLING_SCRATCH(wide));
    s->use_lookup  = (params->draft_sources & PYMOE_DRAFT_LOOKUP) != 0;
    rc = s->use_lookup ? pymoe_ngram_init(&s->lookup, params->ngram_min, params->ngram_max) : PYMOE_OK;  /* no message */
    if (!s->pending || !s->scratch || rc != PYMOE_OK) {
        pymoe_spec_free(s);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    rc = params->draft_sources & PYMOE_DRAFT_MTP ? pymoe_mtp_attach(target, &s->mtp) : PYMOE_OK;
    if (rc != PYMOE_OK) {
        pymoe_spec_free(s);
        return rc;
    }
    pymoe_rng_seed(&s->rng, params->seed);
    s->batch_cap = verify_batch_cap();
    pymoe_draft_length_init(&s->chooser, params->draft_max);
    /* what auto must count: checkpoints from this k on, and how far snapshots reach */
    s->chooser.target_rewind = t_method == PYMOE_ROLLBACK_REMOVE ? PYMOE_SPEC_MAX_DRAFT
                             : t_method == PYMOE_ROLLBACK_SNAPSHOT ? target->n_rs_seq : 0;
    s->chooser.draft_checkpoints = draft && d_method == PYMOE_ROLLBACK_CHECKPOINT;
    s->chooser.draft_refeeds     = s->mtp != NULL;
    *out = s;
    return pymoe_ok();
}

void pymoe_spec_free(pymoe_spec * s) {
    if (!s) {
        return;
    }
    free(s->pending);  /* an MTP head stays with the target's session: it may be gone already */
    free(s->scratch);
    pymoe_ngram_free(&s->lookup);
    for (int32_t i = 0; i <= PYMOE_SPEC_MAX_DRAFT; i++) {
        if (i < PYMOE_SPEC_MAX_DRAFT) {
            free(s->q[i].ids);
            free(s->q[i].p);
        }
        free(s->p[i].ids);
        free(s->p[i].p);
    }
    free(s);
}

/* Queue tokens for the draft model (none without one). */
static int32_t add_pending(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    if (!s->draft) {
        return PYMOE_OK;
    }
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

static int32_t refuse_broken(void) {
    return pymoe_fail(PYMOE_ESTATE, "an earlier failure left the two models out of step: reset the loop "
                      "(pymoe_spec_reset) and feed the sequence again");
}

static int32_t lookup_full(const pymoe_spec * s, int32_t n) {
    return pymoe_fail(PYMOE_ENOMEM, "out of memory for the lookup index (%d tokens and %d more)", s->lookup.n, n);
}

/* Between calls, each cache holds the sequence but for its pending tokens. A
 * broken invariant is a bug in this file: the loop refuses to go on. */
static int32_t check_in_step(pymoe_spec * s, const char * where) {
    if (s->target->pos + s->n_t_pending == s->n_seq && s->n_t_pending <= PYMOE_SPEC_MAX_BATCH &&
        (!s->draft || s->draft->pos + s->n_pending == s->n_seq) && (!s->use_lookup || s->lookup.n == s->n_seq) &&
        (!s->mtp || pymoe_mtp_position(s->mtp) == s->n_seq)) {
        return PYMOE_OK;
    }
    s->broken = true;
    return pymoe_fail(PYMOE_ESTATE, "internal error after %s: the sequence has %d tokens, the target %d + %d pending, "
                      "the draft %d + %d pending, the lookup index %d, the MTP head %d", where, s->n_seq,
                      s->target->pos, s->n_t_pending, s->draft ? s->draft->pos : -1, s->n_pending,
                      s->use_lookup ? s->lookup.n : -1, s->mtp ? pymoe_mtp_position(s->mtp) : -1);
}

/* After a failed feed a KV cache is put back where it was; recurrent state
 * cannot be, and the loop refuses to go on. */
static void undo_feed(pymoe_spec * s, pymoe_session * m, int32_t start) {
    if (m->pos > start && pymoe_session_rewind(m, m->pos - start) != PYMOE_OK) {
        s->broken = true;
    }
}

/* The target evaluates tokens of the sequence (its pending ones, or a
 * prompt's). An MTP head takes the hidden states of each chunk and catches
 * up on them, so that its queue stays within a chunk. */
static int32_t target_feed(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    if (!s->mtp) {
        return pymoe_session_feed(s->target, tokens, n, false);
    }
    int32_t rc = PYMOE_OK;
    for (int32_t done = 0; rc == PYMOE_OK && done < n;) {
        const int32_t chunk = n - done < s->target->n_batch ? n - done : s->target->n_batch;
        const int32_t first = s->target->pos;
        int32_t       evaluated = 0;
        rc = pymoe_mtp_reserve(s->mtp, 0, chunk);
        rc = rc == PYMOE_OK ? pymoe_session_feed(s->target, tokens + done, chunk, false) : rc;
        rc = rc == PYMOE_OK ? pymoe_mtp_add_rows(s->mtp, first, chunk) : rc;
        rc = rc == PYMOE_OK ? pymoe_mtp_catch_up(s->mtp, &evaluated) : rc;
        s->stats.mtp_tokens += evaluated;
        done += chunk;
    }
    return rc;
}

int32_t pymoe_spec_feed(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    if (!s || !tokens || n <= 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_feed: need the loop and at least one token");
    }
    if (s->broken) {
        return refuse_broken();
    }
    int32_t rc = pymoe_check_tokens(s->target->model, tokens, n);
    if (rc == PYMOE_OK && s->draft) {
        rc = pymoe_check_tokens(s->draft->model, tokens, n);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    /* the target evaluates t_pending + tokens[:-1]; tokens[-1] waits */
    int32_t t_need = s->target->pos + s->n_t_pending + n;
    int32_t d_need = s->draft ? s->draft->pos + s->n_pending + n : 0;
    if (t_need > s->target->n_ctx || (s->draft && d_need > s->draft->n_ctx)) {
        return pymoe_fail(PYMOE_ECONTEXT,
                          "%d tokens do not fit: the sequence would need %d positions of the target's %d and %d of "
                          "the draft's %d",
                          n, t_need, s->target->n_ctx, d_need, s->draft ? s->draft->n_ctx : 0);
    }
    const int32_t n_pending_before = s->n_pending;
    if (s->use_lookup && pymoe_ngram_reserve(&s->lookup, n) != PYMOE_OK) {
        return lookup_full(s, n);
    }
    rc = s->mtp ? pymoe_mtp_reserve(s->mtp, n, 0) : PYMOE_OK;
    rc = rc == PYMOE_OK ? add_pending(s, tokens, n) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (s->mtp) {
        pymoe_mtp_add_tokens(s->mtp, tokens, n);
    }
    /* both models evaluate the input now (prefill), so that the first round
     * costs what every round costs */
    const int32_t t_start = s->target->pos, d_start = s->draft ? s->draft->pos : 0;
    if (s->n_t_pending > 0) {
        rc = target_feed(s, s->t_pending, s->n_t_pending);
    }
    if (rc == PYMOE_OK && n > 1) {
        rc = target_feed(s, tokens, n - 1);
    }
    if (rc == PYMOE_OK && s->n_pending > 1) {
        rc = pymoe_session_feed(s->draft, s->pending, s->n_pending - 1, false);
    }
    if (rc != PYMOE_OK) {
        s->n_pending = n_pending_before;
        s->broken    = s->broken || s->mtp;  /* its queue took the tokens */
        undo_feed(s, s->target, t_start);
        if (s->draft) {
            undo_feed(s, s->draft, d_start);
        }
        return rc;
    }
    if (s->use_lookup) {
        pymoe_ngram_append(&s->lookup, tokens, n);  /* reserved above: cannot fail */
    }
    s->pending[0]   = tokens[n - 1];
    s->n_pending    = s->draft ? 1 : 0;
    s->t_pending[0] = tokens[n - 1];
    s->n_t_pending  = 1;
    s->n_seq += n;
    rc = check_in_step(s, "a feed");
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

int32_t pymoe_spec_position(const pymoe_spec * s) { return s ? s->n_seq : 0; }

int32_t pymoe_spec_reset(pymoe_spec * s) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_reset: spec is NULL");
    }
    int32_t rc = pymoe_session_reset(s->target);
    rc         = rc == PYMOE_OK && s->draft ? pymoe_session_reset(s->draft) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (s->use_lookup) {
        pymoe_ngram_clear(&s->lookup);
    }
    if (s->mtp) {
        pymoe_mtp_clear(s->mtp);
    }
    s->copying     = false;
    s->n_seq       = 0;
    s->n_pending   = 0;
    s->n_t_pending = 0;
    s->broken      = false;
    return pymoe_ok();
}

int32_t pymoe_spec_set_sampling(pymoe_spec * s, const struct pymoe_sampling_params * sampling, uint64_t seed) {
    if (!s || !sampling) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_set_sampling: spec and sampling must not be NULL");
    }
    int32_t rc = pymoe_check_sampling_params(sampling);
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->params.sampling = *sampling;
    s->params.seed     = seed;
    s->greedy          = sampling->temperature == 0.0f;
    pymoe_rng_seed(&s->rng, seed);
    return pymoe_ok();
}

/* Largest probability of softmax(row): what draft_p_min is compared with in greedy mode. */
static float top_probability(const float * row, int32_t n, pymoe_token top) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        sum += exp((double) row[i] - row[top]);
    }
    return (float) (1.0 / sum);
}

static int by_id(const void * a, const void * b) {
    const pymoe_token x = ((const pymoe_candidate *) a)->id, y = ((const pymoe_candidate *) b)->id;
    return (x > y) - (x < y);
}

/* The sampling distribution of a logits row into r: the transforms' kept
 * candidates (c, n_vocab of them, is scratch), by ascending id. *top: the
 * most likely token's probability. */
static int32_t dist_from_logits(struct dist_row * r, const float * logits, int32_t n_vocab,
                                const struct pymoe_sampling_params * params, pymoe_candidate * c, float * top) {
    const int32_t n = pymoe_sampling_transform(logits, n_vocab, params, c);
    *top            = c[0].p;
    if (n > r->cap) {
        pymoe_token * ids = realloc(r->ids, sizeof(*ids) * (size_t) n);
        r->ids            = ids ? ids : r->ids;
        float * p         = realloc(r->p, sizeof(*p) * (size_t) n);
        r->p              = p ? p : r->p;
        if (!ids || !p) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory for a sampling distribution of %d tokens", n);
        }
        r->cap = n;
    }
    qsort(c, (size_t) n, sizeof(*c), by_id);
    for (int32_t i = 0; i < n; i++) {
        r->ids[i] = c[i].id;
        r->p[i]   = c[i].p;
    }
    r->n = n;
    return PYMOE_OK;
}

/* The last logits row of a session that was just fed. */
static const float * last_row(const pymoe_session * s) {
    return s->logits + (size_t) (s->n_logit_rows - 1) * s->n_vocab;
}

/* What one round did, step by step; the last step accounts for it. */
struct round {
    int32_t      k;           /* draft length chosen */
    int32_t      n_draft;     /* drafts proposed: k, or fewer when the draft was unsure */
    int32_t      match_length; /* drafts copied from the context: the match they came from (0: none) */
    int32_t      lookup_arm;   /* what auto learns their acceptance by (draft_length.h) */
    int32_t      in_cache;    /* of which the draft has evaluated (the last one it never sees) */
    bool         saved;       /* the target took a checkpoint before the batch */
    int32_t      n_batch;     /* target batch: t_pending + drafts */
    int32_t      t_first;     /* its first position */
    const pymoe_token * drafts;  /* in s->batch, after t_pending */
    int32_t      n_accepted;
    pymoe_token  next;
    bool         ends;        /* next is an end-of-generation token */
    double       t_start, t_drafted, t_batch, t_verified, t_rollback;  /* clock; t_rollback: seconds */
    struct pymoe_round_cost cost;
};

/* The most drafts a round may verify: no more than draft_max, the tokens
 * wanted, positions left in the target's context, or room in one target
 * batch after the tokens it must evaluate again. */
static int32_t draft_room(const pymoe_spec * s, int32_t max_tokens) {
    int32_t k      = s->params.draft_max;
    int32_t t_room = s->target->n_ctx - s->target->pos - s->n_t_pending;
    int32_t b_room = (s->target->n_batch < s->batch_cap ? s->target->n_batch : s->batch_cap) - s->n_t_pending;
    if (k > max_tokens - 1) k = max_tokens - 1;
    /* Tokens queued by restores are evaluated again in every batch until one
     * round keeps all of its drafts: past a draft's worth, a round without
     * drafts clears them (it needs no checkpoint and still emits a token). */
    if (s->n_t_pending > s->params.draft_max + 1) k = 0;
    if (k > t_room) k = t_room;
    if (k > b_room) k = b_room;
    return k < 0 ? 0 : k;
}

/* Lookup: the longest earlier match of the sequence's end proposes what
 * followed it; auto decides how much of it to verify from what matches of
 * that length were worth (none: the round is left to the draft model, or
 * decoded plainly). */
static void lookup_draft(pymoe_spec * s, struct round * r, int32_t room) {
    int32_t       length = 0;
    const int32_t n      = pymoe_ngram_lookup(&s->lookup, room, s->batch + 1, &length);
    if (n == 0) {
        return;
    }
    s->stats.lookup_matches[length] += 1;
    const int32_t arm = s->copying ? PYMOE_LOOKUP_CONTINUES : length;
    const int32_t k   = s->params.auto_draft ? pymoe_draft_length_choose_lookup(&s->chooser, arm, n) : n;
    if (k > 0) {
        r->k            = k;
        r->n_draft      = k;
        r->match_length = length;
        r->lookup_arm   = arm;
    }
}

/* Draft token i from a row of draft logits: the argmax (greedy) or a draw
 * from the row's sampling distribution (kept in s->q[i] for the verifier);
 * *sure is false when the draft's top probability is below draft_p_min. */
static int32_t pick_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure) {
    float top;
    if (s->greedy) {
        *d  = pymoe_argmax(row, s->n_common);
        top = s->params.draft_p_min > 0.0f ? top_probability(row, s->n_common, *d) : 1.0f;
    } else {
        const double      t  = pymoe_now();
        struct dist_row * q  = &s->q[i];
        int32_t           rc = dist_from_logits(q, row, s->n_common, &s->params.sampling, s->scratch, &top);
        if (rc != PYMOE_OK) {
            return rc;
        }
        const int32_t at = pymoe_draw(q->p, NULL, q->n, 1, pymoe_rng_uniform(&s->rng));
        if (at < 0) {
            return pymoe_fail(PYMOE_EINVAL, "the draft's distribution has no probability mass");
        }
        *d = q->ids[at];
        s->stats.draft_sampling_seconds += pymoe_now() - t;
    }
    *sure = top >= s->params.draft_p_min;
    return PYMOE_OK;
}

/* The draft model: it catches up on its pending tokens and proposes up to k
 * tokens (fixed, or auto's choice) into s->batch[1..]. */
static int32_t model_draft(pymoe_spec * s, struct round * r, int32_t room) {
    struct pymoe_round_cost * cost = &r->cost;
    int32_t k      = s->params.auto_draft ? pymoe_draft_length_choose(&s->chooser) : s->params.draft_max;
    int32_t d_room = s->draft->n_ctx - s->draft->pos - s->n_pending + 1;  /* positions left in its context */
    if (k > room) k = room;
    if (k > d_room) k = d_room;
    r->k = k < 0 ? 0 : k;
    if (r->k > 0) {
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
        if (s->d_method == PYMOE_ROLLBACK_CHECKPOINT && r->k >= 2) {  /* the drafts it is fed may be rejected */
            const double t = pymoe_now();
            rc = pymoe_session_checkpoint(s->draft);
            if (rc != PYMOE_OK) {
                return rc;
            }
            cost->draft_save_seconds = pymoe_now() - t;
            s->stats.checkpoints += 1;
        }
        for (int32_t i = 0; i < r->k; i++) {
            pymoe_token d;
            bool        sure;
            rc = pick_draft(s, last_row(s->draft), i, &d, &sure);
            if (rc != PYMOE_OK) {
                return rc;
            }
            if (!sure) {
                break;  /* the draft is unsure: stop here */
            }
            s->batch[1 + r->n_draft++] = d;
            if (i + 1 < r->k) {
                rc = pymoe_session_feed(s->draft, &d, 1, false);
                if (rc != PYMOE_OK) {
                    return rc;
                }
                r->in_cache = i + 1;
            }
        }
    }
    return PYMOE_OK;
}

/* Past this many tokens waiting, the MTP head catches up even in a round it
 * does not draft in: its queue holds a hidden state per token. */
enum { MTP_BACKLOG = 64 };

/* The MTP head: it catches up on the tokens accepted since it last ran (the
 * newest one's logits propose d_1), then runs on its own drafts for d_2..d_k;
 * those entries are dropped again (the target's hidden states replace them). */
static int32_t mtp_draft(pymoe_spec * s, struct round * r, int32_t room) {
    int32_t k = s->params.auto_draft ? pymoe_draft_length_choose(&s->chooser) : s->params.draft_max;
    k         = k < room ? k : room;
    if (k <= 0) {
        return PYMOE_OK;
    }
    const double  t         = pymoe_now();
    int32_t       evaluated = 0;
    const float * row       = NULL;
    int32_t       rc        = pymoe_mtp_first(s->mtp, &row, &evaluated);
    r->cost.catchup_tokens = evaluated;
    r->k                   = row ? k : 0;  /* no row: the newest token has no hidden state yet, a plain round */
    for (int32_t i = 0; rc == PYMOE_OK && i < r->k; i++) {
        pymoe_token d;
        bool        sure = false;
        rc = pick_draft(s, row, i, &d, &sure);
        if (rc != PYMOE_OK || !sure) {
            break;
        }
        s->batch[1 + r->n_draft++] = d;
        if (i + 1 < r->k) {
            rc = pymoe_mtp_next(s->mtp, d, &row);
            r->in_cache = i + 1;
        }
    }
    rc = rc == PYMOE_OK ? pymoe_mtp_drop_drafts(s->mtp) : rc;
    s->stats.mtp_tokens += evaluated + r->in_cache;
    s->stats.mtp_seconds += pymoe_now() - t;
    return rc;
}

/* Step 1, draft: the sources in turn (lookup, then the draft model or the
 * MTP head) until one proposes; then the target saves a checkpoint when
 * snapshots could not take back a rejection of all the drafts. */
static int32_t draft_step(pymoe_spec * s, struct round * r, int32_t max_tokens) {
    const int32_t room = draft_room(s, max_tokens);
    if (s->use_lookup && room > 0) {
        lookup_draft(s, r, room);
    }
    int32_t rc = r->n_draft == 0 && s->draft ? model_draft(s, r, room) : PYMOE_OK;
    rc         = rc == PYMOE_OK && r->n_draft == 0 && s->mtp ? mtp_draft(s, r, room) : rc;
    if (rc == PYMOE_OK && s->mtp && pymoe_mtp_backlog(s->mtp) >= MTP_BACKLOG) {
        int32_t evaluated = 0;
        rc = pymoe_mtp_catch_up(s->mtp, &evaluated);
        s->stats.mtp_tokens += evaluated;
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    r->t_drafted = pymoe_now();
    /* a checkpoint when the drafts could be rejected beyond what snapshots take back */
    r->saved = r->n_draft > 0 && (s->t_method == PYMOE_ROLLBACK_CHECKPOINT ||
                                  (s->t_method == PYMOE_ROLLBACK_SNAPSHOT && r->n_draft > s->target->n_rs_seq));
    if (r->saved) {
        rc = pymoe_session_checkpoint(s->target);
        if (rc != PYMOE_OK) {
            return rc;
        }
        s->stats.checkpoints += 1;
        if (s->stats.checkpoint_bytes == 0) {
            s->stats.checkpoint_bytes = pymoe_session_checkpoint_size(s->target);
        }
        r->cost.target_save_seconds = pymoe_now() - r->t_drafted;
    }
    return PYMOE_OK;
}

/* Step 2, verify: the target evaluates [t_pending, drafts] in one batch and
 * the verifier keeps a prefix of the drafts and chooses the next token; an
 * accepted end-of-generation token ends the sequence there. */
static const float ONE = 1.0f;

static int32_t verify_step(pymoe_spec * s, struct round * r) {
    const size_t  V    = (size_t) s->n_vocab;
    const int32_t n_tp = s->n_t_pending;
    r->t_batch         = pymoe_now();
    r->n_batch         = n_tp + r->n_draft;
    memmove(s->batch + n_tp, s->batch + 1, sizeof(*s->batch) * (size_t) r->n_draft);  /* drafts were at 1.. */
    memcpy(s->batch, s->t_pending, sizeof(*s->batch) * (size_t) n_tp);
    r->drafts  = s->batch + n_tp;
    r->t_first = s->target->pos;
    int32_t rc = pymoe_session_feed_rows(s->target, s->batch, r->n_batch, n_tp - 1);
    if (rc != PYMOE_OK) {
        return rc;
    }
    r->t_verified        = pymoe_now();
    const float * logits = s->target->logits;  /* n_draft + 1 rows: the last pending token's, then the drafts' */
    double t_verifier = r->t_verified;
    if (s->greedy) {
        rc = pymoe_verify(PYMOE_VERIFY_GREEDY, r->drafts, r->n_draft, NULL, logits, s->n_vocab, NULL, &r->n_accepted,
                          &r->next);
    } else {
        struct pymoe_sparse_row q[PYMOE_SPEC_MAX_DRAFT], p[PYMOE_SPEC_MAX_DRAFT + 1];
        for (int32_t i = 0; i <= r->n_draft; i++) {
            float top;
            rc = dist_from_logits(&s->p[i], logits + i * V, s->n_vocab, &s->params.sampling, s->scratch, &top);
            if (rc != PYMOE_OK) {
                return rc;
            }
            p[i] = (struct pymoe_sparse_row) { s->p[i].ids, s->p[i].p, s->p[i].n };
            if (i < r->n_draft && r->match_length > 0) {  /* a copied draft is certain: q is one-hot */
                q[i] = (struct pymoe_sparse_row) { &r->drafts[i], &ONE, 1 };
            } else if (i < r->n_draft) {
                q[i] = (struct pymoe_sparse_row) { s->q[i].ids, s->q[i].p, s->q[i].n };
            }
            s->u[i] = pymoe_rng_uniform(&s->rng);
        }
        t_verifier = pymoe_now();
        s->stats.target_sampling_seconds += t_verifier - r->t_verified;
        rc = pymoe_verify_sparse(r->drafts, r->n_draft, q, p, s->n_vocab, s->u, &r->n_accepted, &r->next);
    }
    s->stats.verifier_seconds += pymoe_now() - t_verifier;
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (s->inspect) {
        struct pymoe_spec_round seen = { r->drafts, r->n_draft, logits, s->n_vocab, r->n_accepted, r->next };
        s->inspect(&seen, s->inspect_user_data);
    }
    for (int32_t i = 0; i < r->n_accepted; i++) {
        if (pymoe_model_token_is_eog(s->target->model, r->drafts[i])) {
            r->next       = r->drafts[i];
            r->n_accepted = i;
            break;
        }
    }
    return PYMOE_OK;
}

/* Drop the rejected drafts from the target. With a checkpoint (saved when
 * snapshots could not cover n_draft) and more rejected than a snapshot can
 * take back: restore it, and queue what it forgot (the batch's accepted part
 * and next) to be evaluated with the next batch (choose_k keeps that backlog
 * bounded). Either way next joins the target's pending tokens. */
static int32_t target_rollback(pymoe_spec * s, struct round * r) {
    const int32_t rejected = r->n_draft - r->n_accepted;
    const double  t        = pymoe_now();
    int32_t       rc       = PYMOE_OK;
    if (rejected == 0) {
        s->n_t_pending = 0;
    } else if (!r->saved || rejected <= pymoe_session_rewind_limit(s->target)) {
        rc = pymoe_session_rewind(s->target, rejected);
        s->n_t_pending = 0;
    } else {
        rc = pymoe_session_restore(s->target);
        s->stats.restores += 1;
        const int32_t keep = r->n_batch - rejected;  /* t_pending + accepted drafts */
        s->stats.refed_tokens += keep;
        memmove(s->t_pending, s->batch, sizeof(*s->batch) * (size_t) keep);
        s->n_t_pending = keep;
        r->cost.target_restore_seconds = pymoe_now() - t;
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->t_pending[s->n_t_pending++] = r->next;
    return PYMOE_OK;
}

/* Drop the rejected drafts from the draft: rewind (KV cache) or restore the
 * checkpoint saved before them (recurrent state: all drafts become pending
 * again). Then the accepted drafts it has not evaluated, and next, join its
 * pending tokens. */
static int32_t draft_rollback(pymoe_spec * s, struct round * r, const pymoe_token * accepted) {
    int32_t       keep = r->n_accepted < r->in_cache ? r->n_accepted : r->in_cache;
    const double  t    = pymoe_now();
    int32_t       rc   = PYMOE_OK;
    if (r->in_cache > keep && s->d_method == PYMOE_ROLLBACK_CHECKPOINT) {
        rc = pymoe_session_restore(s->draft);
        keep = 0;
        s->stats.restores += 1;
        r->cost.draft_restore_seconds = pymoe_now() - t;
    } else if (r->in_cache > keep) {
        rc = pymoe_session_rewind(s->draft, r->in_cache - keep);
    }
    rc = rc == PYMOE_OK ? add_pending(s, accepted + keep, r->n_accepted - keep) : rc;
    return rc == PYMOE_OK ? add_pending(s, &r->next, 1) : rc;
}

/* Step 3, roll back: both caches drop what was rejected and queue what they
 * have not evaluated yet; the sequence has grown by the accepted drafts and
 * next, unless next ends the generation: as a plain session does, the
 * sequence then ends before it (it was the last token both caches still had
 * to evaluate). The lookup index learns the new tokens (room reserved). */
static int32_t rollback_step(pymoe_spec * s, struct round * r, pymoe_token * out) {
    memcpy(out, r->drafts, sizeof(*out) * (size_t) r->n_accepted);  /* before the target's rollback reuses the batch */
    out[r->n_accepted] = r->next;
    r->ends            = pymoe_model_token_is_eog(s->target->model, r->next);
    const double t     = pymoe_now();
    int32_t      rc    = PYMOE_OK;
    if (s->mtp) {  /* the hidden states of the batch's accepted part, before a restore could touch them */
        rc = pymoe_mtp_add_rows(s->mtp, r->t_first, r->n_batch - r->n_draft + r->n_accepted);
        pymoe_mtp_add_tokens(s->mtp, out, r->n_accepted + !r->ends);
    }
    rc = rc == PYMOE_OK ? target_rollback(s, r) : rc;
    rc = rc == PYMOE_OK && s->draft ? draft_rollback(s, r, out) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->n_seq += r->n_accepted + 1;
    if (r->ends) {
        s->n_t_pending -= 1;
        s->n_pending -= s->draft ? 1 : 0;
        s->n_seq -= 1;
    }
    if (s->use_lookup) {
        pymoe_ngram_append(&s->lookup, out, r->n_accepted + !r->ends);
    }
    r->t_rollback = pymoe_now() - t;
    return check_in_step(s, "a round");
}

/* Step 4, account: what the round emits and why generation stops, the
 * statistics, and what the draft-length chooser learns from the round. */
static void account_step(pymoe_spec * s, struct round * r, int32_t max_tokens, pymoe_token * out, int32_t * n_out,
                         int32_t * stop) {
    *n_out = r->n_accepted + !r->ends;  /* next is in out already */
    if (r->ends) {
        *stop = PYMOE_STOP_EOG;
    } else {
        if (*n_out >= max_tokens) {
            *stop = PYMOE_STOP_MAX_TOKENS;
        } else if (s->target->pos + s->n_t_pending > s->target->n_ctx) {
            *stop = PYMOE_STOP_CONTEXT_FULL;
        }
    }
    struct pymoe_round_cost * cost   = &r->cost;
    const double              t_end  = pymoe_now();
    const double              draft  = r->t_drafted - r->t_start - cost->draft_save_seconds;
    const double              verify = r->t_verified - r->t_batch;
    const double              other  = t_end - r->t_verified - r->t_rollback;  /* transforms, verification, stats */
    struct pymoe_spec_stats * st     = &s->stats;
    st->rounds += 1;
    st->drafted += r->n_draft;
    st->accepted += r->n_accepted;
    st->emitted += *n_out;
    st->accepted_hist[r->n_accepted] += 1;
    st->draft_seconds += draft;
    st->verify_seconds += verify;
    st->other_seconds += other;
    st->rollback_seconds += r->t_rollback + cost->target_save_seconds + cost->draft_save_seconds;
    st->verify_seconds_by_n[r->n_draft + 1] += verify;
    st->verify_count_by_n[r->n_draft + 1] += 1;
    st->rounds_by_k[r->k] += 1;
    st->max_verify_batch = r->n_batch > st->max_verify_batch ? r->n_batch : st->max_verify_batch;
    st->last_k = r->k;
    for (int32_t i = 1; r->match_length == 0 && i <= r->n_draft && i <= r->n_accepted + 1; i++) {
        st->depth_drafted[i] += 1;  /* drafts after the first rejection were never tested */
        st->depth_accepted[i] += i <= r->n_accepted;
    }
    if (r->match_length > 0) {
        st->lookup_rounds[r->match_length] += 1;
        st->lookup_drafted[r->match_length] += r->n_draft;
        st->lookup_accepted[r->match_length] += r->n_accepted;
    }
    cost->lookup_arm     = r->lookup_arm;
    s->copying           = r->match_length > 0 && r->n_accepted == r->n_draft && !r->ends;
    cost->n_draft        = r->n_draft;
    cost->n_accepted     = r->n_accepted;
    cost->batch_tokens   = r->n_batch;
    cost->draft_tokens   = r->k > 0 ? cost->catchup_tokens + r->in_cache : 0;
    cost->draft_seconds  = draft;
    cost->verify_seconds = verify;
    cost->other_seconds  = other;
    cost->round_seconds  = t_end - r->t_start;
    pymoe_draft_length_update(&s->chooser, cost);
    st->acceptance_estimate = pymoe_draft_length_acceptance(&s->chooser);
    st->gated_rounds        = s->chooser.gated;
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
    if (s->broken) {
        return refuse_broken();
    }
    if (s->n_t_pending == 0) {
        return pymoe_fail(PYMOE_ESTATE, "feed a prompt first");
    }
    if (max_tokens <= 0) {
        *stop = PYMOE_STOP_MAX_TOKENS;
        return pymoe_ok();
    }
    if (s->target->pos + s->n_t_pending > s->target->n_ctx) {
        *stop = PYMOE_STOP_CONTEXT_FULL;
        return pymoe_ok();
    }
    /* room in the lookup index for what the round may add, before anything
     * that cannot be taken back */
    if (s->use_lookup && pymoe_ngram_reserve(&s->lookup, s->params.draft_max + 1) != PYMOE_OK) {
        return lookup_full(s, s->params.draft_max + 1);
    }
    int32_t rc = s->mtp ? pymoe_mtp_reserve(s->mtp, s->params.draft_max + 1, PYMOE_SPEC_MAX_BATCH) : PYMOE_OK;
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct round r  = { .t_start = pymoe_now() };
    rc              = draft_step(s, &r, max_tokens);
    rc              = rc == PYMOE_OK ? verify_step(s, &r) : rc;
    rc              = rc == PYMOE_OK ? rollback_step(s, &r, out) : rc;
    if (rc != PYMOE_OK) {
        s->broken = true;  /* a decode failed halfway through the round: the caches no longer match */
        return rc;
    }
    account_step(s, &r, max_tokens, out, n_out, stop);
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

/* What auto learned, as bytes: a tag naming this layout (a build whose state
 * differs in size reads as another format), the draft sources, the chooser. */
struct learned_bytes {
    char                      tag[16];
    uint32_t                  size;
    int32_t                   sources;
    struct pymoe_draft_length state;
};
static const char LEARNED_TAG[16] = "pymoe-learned-1";

int32_t pymoe_spec_learned_save(const pymoe_spec * s, void * buf, size_t capacity, size_t * size) {
    if (!s || !size) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_learned_save: NULL argument");
    }
    *size = sizeof(struct learned_bytes);
    if (!buf) {
        return pymoe_ok();
    }
    if (capacity < sizeof(struct learned_bytes)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_learned_save: %zu bytes of room, %zu needed", capacity,
                          sizeof(struct learned_bytes));
    }
    struct learned_bytes b;
    memset(&b, 0, sizeof(b));  /* padding too: the bytes go to a file */
    memcpy(b.tag, LEARNED_TAG, sizeof(b.tag));
    b.size    = (uint32_t) sizeof(b);
    b.sources = s->params.draft_sources;
    b.state   = s->chooser;
    memcpy(buf, &b, sizeof(b));
    return pymoe_ok();
}

int32_t pymoe_spec_learned_load(pymoe_spec * s, const void * buf, size_t size) {
    if (!s || !buf) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_learned_load: NULL argument");
    }
    if (!s->params.auto_draft) {
        return pymoe_fail(PYMOE_EINVAL, "what auto learned is for a loop with draft_max auto");
    }
    struct learned_bytes b;
    if (size != sizeof(b)) {
        return pymoe_fail(PYMOE_EINVAL, "what auto learned: %zu bytes, this build's format has %zu", size, sizeof(b));
    }
    memcpy(&b, buf, sizeof(b));
    if (memcmp(b.tag, LEARNED_TAG, sizeof(b.tag)) != 0 || b.size != sizeof(b)) {
        return pymoe_fail(PYMOE_EINVAL, "what auto learned: not this build's format");
    }
    if (b.sources != s->params.draft_sources) {
        return pymoe_fail(PYMOE_EINVAL, "what auto learned: learned with draft sources %d, this loop has %d",
                          b.sources, s->params.draft_sources);
    }
    if (!pymoe_draft_length_learned_fits(&s->chooser, &b.state)) {
        return pymoe_fail(PYMOE_EINVAL, "what auto learned: another k_max or rollback, or figures no run produces");
    }
    pymoe_draft_length_warm_start(&s->chooser, &b.state);
    return pymoe_ok();
}

void pymoe_spec_set_inspect(pymoe_spec * s, pymoe_spec_inspect_fn fn, void * user_data) {
    if (s) {
        s->inspect           = fn;
        s->inspect_user_data = user_data;
    }
}
