/* speculative.c - the draft/verify loop: a target session, and drafts from
 * the sources the loop was made with (spec_loop.h's interface: lookup in
 * source_lookup.c, a draft model in source_model.c, the target's MTP head in
 * source_mtp.c), registered in SOURCES below.
 *
 * The sequence (seq) is the prompt plus everything emitted: the loop's one
 * record of what the context holds. Invariants between calls:
 *   target cache = sequence minus `t_pending` (usually just the newest token;
 *                  more after a checkpoint restore: the tokens to evaluate again);
 *   every source's record ends where the sequence does (its position).
 * A feed (the prompt, a later turn) is taken in by every source and
 * evaluated by the target at once. A round asks the sources in turn until one
 * proposes drafts d_1..d_k (or none: a plain round), evaluates [t_pending,
 * d_1..d_k] on the target in one batch, verifies, and drops what was
 * rejected: the target by removing positions (KV cache), by a
 * recurrent-state snapshot, or by restoring the checkpoint saved before the
 * batch (recurrent state; see enum pymoe_rollback); each source its own way.
 * pymoe_spec_step reads as the round's four steps: draft, verify, roll back,
 * account; every record is checked against the sequence after every feed,
 * round, rewind and load (check_in_step). */
#include "spec_loop.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The draft sources, in the order a round asks them. */
static const struct draft_source * const SOURCES[] = { &pymoe_lookup_source, &pymoe_model_source,
                                                       &pymoe_mtp_source };
enum { N_KINDS = sizeof(SOURCES) / sizeof(SOURCES[0]) };

PYMOE_PARAMS_END_AT(struct pymoe_spec_params, ngram_max);

static const struct pymoe_spec_params DEFAULTS = {
    .size          = sizeof(struct pymoe_spec_params),
    .draft_max     = 4,
    .sampling      = NULL,  /* sampled, as a session samples */
    .rollback      = PYMOE_ROLLBACK_AUTO,
    .draft_sources = PYMOE_DRAFT_MODEL,
    .ngram_min     = 2,
    .ngram_max     = 12,
};

void pymoe_spec_params_init(struct pymoe_spec_params * params, size_t size) {
    pymoe_struct_init(params, &DEFAULTS, sizeof(DEFAULTS), size);
}

/* The loop's own copy of a caller's sampling params (NULL: the defaults), checked. */
static int32_t copy_sampling(const struct pymoe_sampling_params * sampling, struct pymoe_sampling_params * out) {
    struct pymoe_sampling_params         defaults, local;
    const struct pymoe_sampling_params * use = NULL;
    pymoe_sampling_params_default(&defaults);
    int32_t rc = pymoe_sampling_params_in(sampling ? sampling : &defaults, &local, &use);
    if (rc == PYMOE_OK) {
        *out = *use;
    }
    return rc;
}

/* A bias for a token outside the target's vocabulary, refused before any round could fail on it. */
static int32_t check_bias(const struct pymoe_sampling_params * sampling, int32_t n_vocab) {
    for (int32_t i = 0; i < sampling->n_logit_bias; i++) {
        const pymoe_token id = sampling->logit_bias[i].token;
        if (id < 0 || id >= n_vocab) {
            return pymoe_fail(PYMOE_ETOKEN, "logit_bias: token %d is outside the vocabulary [0, %d)", id, n_vocab);
        }
    }
    return PYMOE_OK;
}

/* The loop keeps its sampling for later rounds: its own copy of the caller's logit_bias (the old one freed). */
static int32_t own_bias(pymoe_spec * s, struct pymoe_sampling_params * sampling) {
    struct pymoe_logit_bias * copy = NULL;
    if (sampling->n_logit_bias > 0) {
        copy = malloc(sizeof(*copy) * (size_t) sampling->n_logit_bias);
        if (!copy) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        memcpy(copy, sampling->logit_bias, sizeof(*copy) * (size_t) sampling->n_logit_bias);
    }
    free(s->bias);
    s->bias               = copy;
    sampling->logit_bias  = copy;
    s->sampling           = *sampling;
    return PYMOE_OK;
}

static const char * method_name(int32_t m) {
    switch (m) {
        case PYMOE_ROLLBACK_REMOVE:     return "remove";
        case PYMOE_ROLLBACK_SNAPSHOT:   return "snapshot";
        case PYMOE_ROLLBACK_CHECKPOINT: return "checkpoint";
        default:                        return "auto";
    }
}

/* The cheapest rollback the target supports, or the one asked for if it can. */
static int32_t resolve_rollback(const pymoe_session * s, int32_t asked, int32_t * out) {
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
        return pymoe_fail(PYMOE_EINVAL, "the target (%s) cannot roll back by %s: %s", s->model->info.arch,
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

/* The draft sources asked for, against the sessions given: known ones, at
 * most one that is a model (its drafts are not certain: the chooser prices
 * one model's time), and a draft session exactly when a draft model drafts. */
static int32_t check_sources(const pymoe_session * target, const pymoe_session * draft,
                             const struct pymoe_spec_params * params) {
    const int32_t sources = params->draft_sources;
    int32_t       known = 0, models = 0;
    for (int32_t i = 0; i < N_KINDS; i++) {
        known |= SOURCES[i]->kind;
        models += (sources & SOURCES[i]->kind) && !SOURCES[i]->deterministic;
    }
    if (sources <= 0 || (sources & ~known) != 0 || models > 1) {
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
    return PYMOE_OK;
}

int32_t pymoe_spec_create(pymoe_session * target, pymoe_session * draft, const struct pymoe_spec_params * params,
                          pymoe_spec ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: out is NULL");
    }
    if (!target || !params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_create: target and params are required");
    }
    struct pymoe_spec_params local = DEFAULTS;
    int32_t                  rc    = pymoe_struct_in(params, &local, sizeof(local),
                                                     PYMOE_PARAMS_V1(struct pymoe_spec_params, ngram_max),
                                                     "pymoe_spec_params");
    if (rc != PYMOE_OK) {
        return rc;
    }
    params = &local;
    rc     = check_sources(target, draft, params);
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
    struct pymoe_sampling_params sampling;
    rc = copy_sampling(params->sampling, &sampling);
    rc = rc == PYMOE_OK ? check_bias(&sampling, target->n_vocab) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (params->rollback < PYMOE_ROLLBACK_AUTO || params->rollback > PYMOE_ROLLBACK_CHECKPOINT) {
        return pymoe_fail(PYMOE_EINVAL, "rollback must be 0 (auto), 1 (remove), 2 (snapshot) or 3 (checkpoint), got %d",
                          params->rollback);
    }
    int32_t t_method = PYMOE_ROLLBACK_REMOVE;
    rc = resolve_rollback(target, params->rollback, &t_method);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (target->in_loop || (draft && draft->in_loop)) {
        return pymoe_fail(PYMOE_ESTATE, "the %s session belongs to another speculative loop already: free that loop "
                          "first (one loop drives a session)", target->in_loop ? "target" : "draft");
    }
    if (target->pos != 0 || (draft && draft->pos != 0)) {
        return pymoe_fail(PYMOE_ESTATE, "the sessions must be empty (target position %d, draft %d); reset them first",
                          target->pos, draft ? draft->pos : 0);
    }
    struct pymoe_spec * s = calloc(1, sizeof(*s));
    if (!s) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    s->target   = target;
    s->draft    = draft;
    s->t_method = t_method;
    s->auto_k   = -1;
    s->logprobs_top = -1;
    s->stats.rollback_target = t_method;
    s->stats.rollback_draft  = PYMOE_ROLLBACK_REMOVE;  /* a draft model's source says otherwise */
    s->params   = *params;
    s->params.sampling = NULL;  /* the caller's: read once, here */
    s->greedy   = sampling.temperature == 0.0f;
    s->n_vocab  = target->n_vocab;
    s->n_common = draft && draft->n_vocab < target->n_vocab ? draft->n_vocab : target->n_vocab;
    size_t wide = (size_t) (draft && draft->n_vocab > target->n_vocab ? draft->n_vocab : target->n_vocab);
    s->cap_seq  = target->n_ctx + PYMOE_SPEC_MAX_BATCH + 1;  /* the sequence never outgrows the target's context */
    s->seq      = malloc(sizeof(*s->seq) * (size_t) s->cap_seq);
    s->scratch  = malloc(PYMOE_SAMPLING_SCRATCH(wide));
    if (!s->seq || !s->scratch || own_bias(s, &sampling) != PYMOE_OK) {
        pymoe_spec_free(s);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    pymoe_rng_seed(&s->rng, params->seed);
    s->batch_cap = verify_batch_cap();
    pymoe_draft_length_init(&s->chooser, params->draft_max);
    /* what auto must count: checkpoints from this k on, and how far snapshots reach */
    s->chooser.target_rewind = t_method == PYMOE_ROLLBACK_REMOVE ? PYMOE_SPEC_MAX_DRAFT
                             : t_method == PYMOE_ROLLBACK_SNAPSHOT ? target->n_rs_seq : 0;
    for (int32_t i = 0; i < N_KINDS; i++) {
        if (params->draft_sources & SOURCES[i]->kind) {
            void * state = NULL;
            rc = SOURCES[i]->open(s, &state);
            if (rc != PYMOE_OK) {
                pymoe_spec_free(s);
                return rc;
            }
            s->sources[s->n_sources].ops   = SOURCES[i];
            s->sources[s->n_sources].state = state;
            s->n_sources += 1;
        }
    }
    target->in_loop = true;  /* from now on the loop keeps the sequence: the sessions refuse outside changes */
    if (draft) {
        draft->in_loop = true;
    }
    *out = s;
    return pymoe_ok();
}

void pymoe_spec_free(pymoe_spec * s) {
    if (!s) {
        return;
    }
    /* the sessions outlive the loop (pymoe.h): they are the caller's again */
    s->target->in_loop = false;
    if (s->draft) {
        s->draft->in_loop = false;
    }
    for (int32_t i = 0; i < s->n_sources; i++) {
        s->sources[i].ops->close(s->sources[i].state);
    }
    pymoe_grammar_free(s->draft_walk);
    free(s->seq);
    free(s->scratch);
    free(s->bias);
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

int32_t pymoe_spec_feed_last(pymoe_session * m, const pymoe_token * tokens, int32_t n) {
    return pymoe_owned_feed(m, tokens, n, n - 1);
}

static int32_t refuse_broken(void) {
    return pymoe_fail(PYMOE_ESTATE, "an earlier failure left the loop's caches out of step: reset the loop "
                      "(pymoe_spec_reset) and feed the sequence again");
}

/* Between calls, the target holds the sequence but for t_pending, and every
 * source's record ends where the sequence does. A broken invariant is a bug
 * in the loop or a source: the loop refuses to go on. */
static int32_t check_in_step(pymoe_spec * s, const char * where) {
    bool ok = s->target->pos + s->n_t_pending == s->n_seq && s->n_t_pending <= PYMOE_SPEC_MAX_BATCH;
    int32_t bad = -1;
    for (int32_t i = 0; ok && i < s->n_sources; i++) {
        ok  = s->sources[i].ops->position(s, s->sources[i].state) == s->n_seq;
        bad = ok ? -1 : i;
    }
    if (ok) {
        return PYMOE_OK;
    }
    s->broken = true;
    if (bad >= 0) {
        return pymoe_fail(PYMOE_ESTATE, "internal error after %s: the sequence has %d tokens, the %s holds %d",
                          where, s->n_seq, s->sources[bad].ops->name,
                          s->sources[bad].ops->position(s, s->sources[bad].state));
    }
    return pymoe_fail(PYMOE_ESTATE, "internal error after %s: the sequence has %d tokens, the target %d + %d pending",
                      where, s->n_seq, s->target->pos, s->n_t_pending);
}

/* Every source back to the first n tokens of the sequence (s->seq holds
 * them): after a failed feed, or a rewind. */
static int32_t sources_back_to(pymoe_spec * s, int32_t n) {
    int32_t rc = PYMOE_OK;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const struct draft_source * ops = s->sources[i].ops;
        rc = n == 0 ? ops->clear(s, s->sources[i].state) : ops->rewind(s, s->sources[i].state, n);
    }
    return rc;
}

/* The target evaluates tokens of the sequence (its pending ones, or a
 * prompt's), in chunks that sources reading its hidden states (the MTP
 * head) take in one at a time. */
static int32_t target_feed(pymoe_spec * s, const pymoe_token * tokens, int32_t n) {
    int32_t rc = PYMOE_OK;
    for (int32_t done = 0; rc == PYMOE_OK && done < n;) {
        const int32_t chunk = n - done < s->target->n_batch ? n - done : s->target->n_batch;
        const int32_t first = s->target->pos;
        rc = pymoe_spec_feed_last(s->target, tokens + done, chunk);
        for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
            const struct draft_source * ops = s->sources[i].ops;
            rc = ops->target_fed ? ops->target_fed(s, s->sources[i].state, first, chunk) : PYMOE_OK;
        }
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
    if (rc != PYMOE_OK) {
        return rc;
    }
    /* the target evaluates t_pending + tokens[:-1]; tokens[-1] waits */
    const int32_t t_need = s->target->pos + s->n_t_pending + n;
    if (t_need > s->target->n_ctx) {
        return pymoe_fail(PYMOE_ECONTEXT, "%d tokens do not fit: the sequence would need %d positions of the "
                          "target's %d", n, t_need, s->target->n_ctx);
    }
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const struct draft_source * ops = s->sources[i].ops;
        rc = ops->reserve ? ops->reserve(s, s->sources[i].state, n) : PYMOE_OK;
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    /* every source takes the tokens in (a draft model evaluates them now: a
     * prefill, so that the first round costs what every round costs), then
     * the target evaluates them */
    const int32_t t_start = s->target->pos;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const struct draft_source * ops = s->sources[i].ops;
        rc = ops->feed ? ops->feed(s, s->sources[i].state, tokens, n) : PYMOE_OK;
    }
    if (rc == PYMOE_OK && s->n_t_pending > 0) {
        rc = target_feed(s, s->t_pending, s->n_t_pending);
    }
    if (rc == PYMOE_OK && n > 1) {
        rc = target_feed(s, tokens, n - 1);
    }
    if (rc != PYMOE_OK) {  /* back to where the feed began; recurrent state cannot go back: broken */
        char why[512];
        snprintf(why, sizeof(why), "%s", pymoe_last_error());
        const bool target_back = s->target->pos == t_start ||
                                 pymoe_owned_rewind(s->target, s->target->pos - t_start) == PYMOE_OK;
        s->broken = !target_back || sources_back_to(s, s->n_seq) != PYMOE_OK;
        return pymoe_fail(rc, "%s", why);
    }
    s->t_pending[0] = tokens[n - 1];
    s->n_t_pending  = 1;
    memcpy(s->seq + s->n_seq, tokens, sizeof(*tokens) * (size_t) n);  /* fits: checked against the target's n_ctx */
    s->n_seq += n;
    rc = check_in_step(s, "a feed");
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

int32_t pymoe_spec_position(const pymoe_spec * s) { return s ? s->n_seq : 0; }

int32_t pymoe_spec_reset(pymoe_spec * s) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_reset: spec is NULL");
    }
    int32_t rc = pymoe_owned_reset(s->target);
    rc         = rc == PYMOE_OK ? sources_back_to(s, 0) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->n_seq       = 0;
    s->n_t_pending = 0;
    s->broken      = false;
    return pymoe_ok();
}

int32_t pymoe_spec_tokens(const pymoe_spec * s, const pymoe_token ** tokens, int32_t * n) {
    if (!s || !tokens || !n) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_tokens: NULL argument");
    }
    *tokens = s->seq;
    *n      = s->n_seq;
    return pymoe_ok();
}

/* How far back the target can go to keep n_keep tokens: it must hold
 * n_keep - 1 of them (the last one waits for the next round). A KV cache
 * drops any number of positions; recurrent state goes back through its
 * snapshots or to the checkpoint of the last drafting round. */
static bool target_can_keep(const pymoe_spec * s, int32_t n_keep) {
    const int32_t t_keep = s->target->pos < n_keep - 1 ? s->target->pos : n_keep - 1;
    return s->target->pos - t_keep <= pymoe_session_rewind_limit(s->target) ||
           (s->target->ckpt_pos >= 0 && s->target->ckpt_pos <= t_keep);
}

int32_t pymoe_spec_rewind_limit(const pymoe_spec * s) {
    if (!s || s->broken) {
        return 0;
    }
    if (!s->target->recurrent) {
        return s->n_seq;  /* down to nothing */
    }
    int32_t n_keep = s->n_seq;  /* what can be kept is every n_keep above a threshold: find it */
    while (n_keep > 1 && target_can_keep(s, n_keep - 1)) {
        n_keep -= 1;
    }
    return s->n_seq - n_keep;
}

/* The target keeps tokens [0, n_keep - 1) and waits for the last one. */
static int32_t rewind_target(pymoe_spec * s, int32_t n_keep) {
    pymoe_session * t      = s->target;
    const int32_t   t_keep = t->pos < n_keep - 1 ? t->pos : n_keep - 1;
    int32_t         rc     = PYMOE_OK;
    if (t->pos - t_keep <= pymoe_session_rewind_limit(t)) {
        rc = pymoe_owned_rewind(t, t->pos - t_keep);
    } else {  /* the checkpoint, and what came after it again */
        rc = pymoe_owned_restore(t);
        s->stats.restores += rc == PYMOE_OK;
        rc = rc == PYMOE_OK && t->pos < t_keep ? target_feed(s, s->seq + t->pos, t_keep - t->pos) : rc;
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->n_t_pending = n_keep - t->pos;  /* one, or the tokens a restore left to evaluate again */
    memcpy(s->t_pending, s->seq + t->pos, sizeof(*s->t_pending) * (size_t) s->n_t_pending);
    return PYMOE_OK;
}

int32_t pymoe_spec_rewind(pymoe_spec * s, int32_t n_keep) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_rewind: spec is NULL");
    }
    if (s->broken) {
        return refuse_broken();
    }
    if (n_keep < 0 || n_keep > s->n_seq) {
        return pymoe_fail(PYMOE_EINVAL, "cannot keep %d tokens: the sequence has %d", n_keep, s->n_seq);
    }
    if (n_keep == s->n_seq) {
        return pymoe_ok();
    }
    if (n_keep == 0) {
        return pymoe_spec_reset(s);
    }
    if (!target_can_keep(s, n_keep)) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "the target (%s) keeps recurrent state, which can go back %d of the "
                          "sequence's %d tokens now (snapshots of its last batch, or the checkpoint of its last "
                          "drafting round), not %d: rewind less, or reset the loop and feed the tokens to keep",
                          s->target->model->info.arch, pymoe_spec_rewind_limit(s), s->n_seq, s->n_seq - n_keep);
    }
    /* from here a failure leaves the caches out of step: the loop is broken until a reset. The sources go
     * first: the target's feed after a restore hands its hidden states to them. */
    int32_t rc = sources_back_to(s, n_keep);
    rc         = rc == PYMOE_OK ? rewind_target(s, n_keep) : rc;
    if (rc != PYMOE_OK) {
        s->broken = true;
        return rc;
    }
    s->n_seq = n_keep;
    rc       = check_in_step(s, "a rewind");
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

int32_t pymoe_spec_set_sampling(pymoe_spec * s, const struct pymoe_sampling_params * sampling, uint64_t seed) {
    if (!s || !sampling) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_set_sampling: spec and sampling must not be NULL");
    }
    struct pymoe_sampling_params next;
    int32_t                      rc = copy_sampling(sampling, &next);
    rc                              = rc == PYMOE_OK ? check_bias(&next, s->n_vocab) : rc;
    rc                              = rc == PYMOE_OK ? own_bias(s, &next) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    s->params.seed = seed;
    s->greedy      = s->sampling.temperature == 0.0f;
    pymoe_rng_seed(&s->rng, seed);
    return pymoe_ok();
}

int32_t pymoe_spec_set_grammar(pymoe_spec * s, pymoe_grammar * grammar) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_set_grammar: spec is NULL");
    }
    if (grammar && !pymoe_grammar_of(grammar, s->target->model)) {
        return pymoe_fail(PYMOE_EINVAL, "the grammar was made for another model than the loop's target");
    }
    s->grammar = grammar;
    return pymoe_ok();
}

int32_t pymoe_spec_set_logprobs(pymoe_spec * s, int32_t n_top) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_set_logprobs: spec is NULL");
    }
    if (n_top < -1 || n_top > PYMOE_MAX_TOP_LOGPROBS) {
        return pymoe_fail(PYMOE_EINVAL, "logprobs: n_top must be -1 (off) or in [0, %d], got %d",
                          PYMOE_MAX_TOP_LOGPROBS, n_top);
    }
    s->logprobs_top = n_top;
    s->n_logprobs   = 0;
    return pymoe_ok();
}

int32_t pymoe_spec_logprobs(const pymoe_spec * s, const struct pymoe_logprob ** scores, int32_t * n) {
    if (!s || !scores || !n) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_logprobs: NULL argument");
    }
    *scores = s->logprobs;
    *n      = s->n_logprobs;
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

/* The sampling distribution of a logits row into r: the transforms' kept
 * candidates (c, n_vocab of them, is scratch), by ascending id. *top: the
 * most likely token's probability. */
static int32_t dist_keep(struct dist_row * r, pymoe_candidate * c, int32_t n);

/* Room in r for n tokens. */
static int32_t dist_reserve(struct dist_row * r, int32_t n) {
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
    return PYMOE_OK;
}

static int32_t dist_from_logits(struct dist_row * r, const float * logits, int32_t n_vocab,
                                const struct pymoe_sampling_params * params, pymoe_candidate * c, float * top) {
    if (pymoe_sampling_keeps_all(params, n_vocab)) {  /* a temperature alone: every token, in vector passes */
        int32_t rc = dist_reserve(r, n_vocab);
        if (rc != PYMOE_OK) {
            return rc;
        }
        const pymoe_token most = pymoe_sampling_dense(logits, n_vocab, params->temperature, r->p);
        if (most < 0) {
            return most;  /* a PYMOE_ROW_* value: row_error names the row */
        }
        for (int32_t i = 0; i < n_vocab; i++) {
            r->ids[i] = i;
        }
        *top = r->p[most];
        r->n = n_vocab;
        return PYMOE_OK;
    }
    const int32_t n = pymoe_sampling_transform(logits, n_vocab, params, c);
    if (n < 0) {
        return n;  /* a PYMOE_ROW_* value: row_error names the row */
    }
    *top = c[0].p;
    return dist_keep(r, c, n);
}

/* The error for a row the transforms cannot use (PYMOE_ROW_*): whose logits, predicting which position. */
static int32_t row_error(int32_t why, const char * model, int32_t position) {
    char whose[96];
    snprintf(whose, sizeof whose, "the %s's logits for position %d", model, position);
    return pymoe_row_fail(why, whose);
}

/* A row that keeps much of the vocabulary (sampling at a temperature alone keeps all of it) was sorted by
 * comparisons, 15 ms a row at 152k tokens: ids are distinct and below 2^22, so two counting passes of 11
 * bits order them, through r's arrays and back through c. Returns false where an id is out of that range. */
enum { ID_SORT_MIN = 1024, ID_DIGIT_BITS = 11, ID_DIGITS = 1 << ID_DIGIT_BITS };

static bool sort_by_id_in_two_passes(pymoe_candidate * c, int32_t n, struct dist_row * r) {
    int32_t low[ID_DIGITS] = { 0 }, high[ID_DIGITS] = { 0 };
    for (int32_t i = 0; i < n; i++) {
        if (c[i].id < 0 || c[i].id >= ID_DIGITS * ID_DIGITS) {
            return false;
        }
        low[c[i].id & (ID_DIGITS - 1)]++;
        high[c[i].id >> ID_DIGIT_BITS]++;
    }
    for (int32_t d = 0, at_low = 0, at_high = 0; d < ID_DIGITS; d++) {  /* counts -> first places */
        const int32_t l = low[d], h = high[d];
        low[d]  = at_low;
        high[d] = at_high;
        at_low += l;
        at_high += h;
    }
    for (int32_t i = 0; i < n; i++) {  /* by the low digit, into r */
        const int32_t at = low[c[i].id & (ID_DIGITS - 1)]++;
        r->ids[at]       = c[i].id;
        r->p[at]         = c[i].p;
    }
    for (int32_t i = 0; i < n; i++) {  /* by the high digit, in that order, back into c */
        c[high[r->ids[i] >> ID_DIGIT_BITS]++] = (pymoe_candidate) { r->ids[i], 0.0f, r->p[i] };
    }
    for (int32_t i = 0; i < n; i++) {
        r->ids[i] = c[i].id;
        r->p[i]   = c[i].p;
    }
    return true;
}

/* Candidates c[0..n) into r, by ascending id. */
static int32_t dist_keep(struct dist_row * r, pymoe_candidate * c, int32_t n) {
    const int32_t rc = dist_reserve(r, n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n <= ID_SORT_MIN || !sort_by_id_in_two_passes(c, n, r)) {
        qsort(c, (size_t) n, sizeof(*c), pymoe_by_id);
        for (int32_t i = 0; i < n; i++) {
            r->ids[i] = c[i].id;
            r->p[i]   = c[i].p;
        }
    }
    r->n = n;
    return PYMOE_OK;
}

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

/* Under a grammar a draft model drafts from its constrained distribution
 * (what the target's is judged by), walking the grammar along its drafts
 * (s->draft_walk: forked at draft 0, then advanced by the one before); a
 * draft with nothing allowed is unsure. draft_p_min is not applied. */
static int32_t pick_constrained_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure) {
    const double t = pymoe_now();
    int32_t      rc;
    if (i == 0) {
        pymoe_grammar_free(s->draft_walk);
        s->draft_walk = NULL;
        rc = pymoe_grammar_fork(s->grammar, &s->draft_walk);
    } else {
        rc = pymoe_grammar_accept(s->draft_walk, s->batch[i]);  /* the draft before this one */
    }
    int32_t n = 0;
    rc        = rc == PYMOE_OK ? pymoe_grammar_dist(s->draft_walk, row, s->n_common, &s->sampling, s->scratch, &n) : rc;
    if (PYMOE_ROW_UNUSABLE(rc)) {
        return row_error(rc, "draft", s->n_seq + i);
    }
    if (rc == PYMOE_EINVAL) {  /* nothing allowed among the draft's tokens: no draft here */
        *sure = false;
        return pymoe_ok();
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    int32_t at = 0;
    if (!s->greedy) {
        rc = dist_keep(&s->q[i], s->scratch, n);
        at = rc == PYMOE_OK ? pymoe_draw(s->q[i].p, NULL, s->q[i].n, 1, pymoe_rng_uniform(&s->rng)) : -1;
        if (at < 0) {
            return rc != PYMOE_OK ? rc : pymoe_fail(PYMOE_EINVAL, "the draft's distribution has no probability mass");
        }
        *d = s->q[i].ids[at];
    } else {
        *d = s->scratch[0].id;
    }
    s->stats.draft_sampling_seconds += pymoe_now() - t;
    *sure = true;
    return PYMOE_OK;
}

static int32_t pick_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure);

/* A draft follows the target's bias and penalties (over the sequence and the drafts before it), or it would
 * keep proposing what the target's rows rule out; its row is put back after the pick. */
int32_t pymoe_spec_pick_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure) {
    if (!pymoe_sampling_changes_logits(&s->sampling)) {
        return pick_draft(s, row, i, d, sure);
    }
    struct pymoe_row_patch patch;
    int32_t rc = pymoe_row_patch((float *) row, s->n_common, &s->sampling, true, s->seq, s->n_seq, s->batch + 1, i,
                                 &patch);
    rc = rc == PYMOE_OK ? pick_draft(s, row, i, d, sure) : rc;
    pymoe_row_unpatch(&patch);
    return rc;
}

/* Draft token i from a row of draft logits: the argmax (greedy) or a draw
 * from the row's sampling distribution (kept in s->q[i] for the verifier);
 * *sure is false when the draft's top probability is below draft_p_min. */
static int32_t pick_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure) {
    if (s->grammar) {
        return pick_constrained_draft(s, row, i, d, sure);
    }
    float top;
    if (s->greedy) {
        *d = pymoe_argmax(row, s->n_common);
        if (*d < 0) {
            return row_error(*d, "draft", s->n_seq + i);
        }
        top = s->params.draft_p_min > 0.0f ? top_probability(row, s->n_common, *d) : 1.0f;
    } else {
        const double      t  = pymoe_now();
        struct dist_row * q  = &s->q[i];
        int32_t           rc = dist_from_logits(q, row, s->n_common, &s->sampling, s->scratch, &top);
        if (PYMOE_ROW_UNUSABLE(rc)) {
            return row_error(rc, "draft", s->n_seq + i);
        }
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

int32_t pymoe_spec_draft_length(pymoe_spec * s, int32_t room) {
    int32_t k = s->params.draft_max;
    if (s->params.auto_draft) {
        k = s->auto_k = pymoe_draft_length_choose(&s->chooser);
    }
    k = k < room ? k : room;
    return k < 0 ? 0 : k;
}

/* Drafts the grammar forbids can never be accepted: the round's drafts end
 * before the first of them (drafts are at s->batch + 1). */
static int32_t cut_forbidden(pymoe_spec * s, struct round * r) {
    pymoe_grammar * walk = NULL;
    int32_t         rc   = pymoe_grammar_fork(s->grammar, &walk);
    for (int32_t i = 0; rc == PYMOE_OK && i < r->n_draft; i++) {
        bool allowed = false;
        rc = pymoe_grammar_allows(walk, s->batch[1 + i], &allowed);
        if (rc == PYMOE_OK && !allowed) {
            r->n_draft = i;
        } else if (rc == PYMOE_OK && i + 1 < r->n_draft) {
            rc = pymoe_grammar_accept(walk, s->batch[1 + i]);
        }
    }
    pymoe_grammar_free(walk);
    return rc;
}

/* Verification under the grammar: row i is the constrained distribution
 * after the first i drafts (each allowed: cut_forbidden), so a greedy round
 * keeps the drafts that are each row's constrained argmax, and a sampled
 * round verifies against the constrained rows. */
static int32_t verify_constrained(pymoe_spec * s, struct round * r, const float * logits,
                                  struct pymoe_sparse_row * p) {
    const size_t    V    = (size_t) s->n_vocab;
    pymoe_grammar * walk = NULL;
    int32_t         rc   = pymoe_grammar_fork(s->grammar, &walk);
    r->n_accepted        = r->n_draft;
    for (int32_t i = 0; rc == PYMOE_OK && i <= r->n_draft; i++) {
        int32_t n = 0;
        rc        = pymoe_grammar_dist(walk, logits + i * V, s->n_vocab, &s->sampling, s->scratch, &n);
        rc        = PYMOE_ROW_UNUSABLE(rc) ? row_error(rc, "target", r->t_first + s->n_t_pending + i) : rc;
        if (rc == PYMOE_OK && s->greedy && (i == r->n_draft || s->scratch[0].id != r->drafts[i])) {
            r->n_accepted = i;
            r->next       = s->scratch[0].id;
            break;
        }
        rc = rc == PYMOE_OK && !s->greedy ? dist_keep(&s->p[i], s->scratch, n) : rc;
        if (rc == PYMOE_OK && !s->greedy) {
            p[i] = (struct pymoe_sparse_row) { s->p[i].ids, s->p[i].p, s->p[i].n };
        }
        rc = rc == PYMOE_OK && i < r->n_draft ? pymoe_grammar_accept(walk, r->drafts[i]) : rc;
    }
    pymoe_grammar_free(walk);
    return rc;
}

/* Step 1, draft: the sources in turn until one proposes; then the target
 * saves a checkpoint when snapshots could not take back a rejection of all
 * the drafts. */
static int32_t draft_step(pymoe_spec * s, struct round * r, int32_t max_tokens) {
    const int32_t room = draft_room(s, max_tokens);
    int32_t       rc   = PYMOE_OK;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const bool free_before = r->source < 0;
        rc = s->sources[i].ops->propose(s, s->sources[i].state, r, room);
        if (free_before && r->k > 0) {
            r->source = i;  /* it took the round (a draft model unsure of its first token drafts none) */
        }
    }
    /* a model's drafts were drawn under the grammar already (pymoe_spec_pick_draft); copied ones were not */
    const bool copied = r->source >= 0 && s->sources[r->source].ops->deterministic;
    rc = rc == PYMOE_OK && s->grammar && copied && r->n_draft > 0 ? cut_forbidden(s, r) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    r->t_drafted = pymoe_now();
    /* a checkpoint when the drafts could be rejected beyond what snapshots take back */
    r->saved = r->n_draft > 0 && (s->t_method == PYMOE_ROLLBACK_CHECKPOINT ||
                                  (s->t_method == PYMOE_ROLLBACK_SNAPSHOT && r->n_draft > s->target->n_rs_seq));
    if (r->saved) {
        rc = pymoe_owned_checkpoint(s->target);
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

static int32_t decide(pymoe_spec * s, struct round * r, const float * logits);

static int32_t verify_step(pymoe_spec * s, struct round * r) {
    const int32_t n_tp = s->n_t_pending;
    r->t_batch         = pymoe_now();
    r->n_batch         = n_tp + r->n_draft;
    memmove(s->batch + n_tp, s->batch + 1, sizeof(*s->batch) * (size_t) r->n_draft);  /* drafts were at 1.. */
    memcpy(s->batch, s->t_pending, sizeof(*s->batch) * (size_t) n_tp);
    r->drafts  = s->batch + n_tp;
    r->t_first = s->target->pos;
    int32_t rc = pymoe_owned_feed(s->target, s->batch, r->n_batch, n_tp - 1);
    if (rc != PYMOE_OK) {
        return rc;
    }
    r->t_verified        = pymoe_now();
    const float * logits = s->target->logits;  /* n_draft + 1 rows: the last pending token's, then the drafts' */
    /* the bias and penalties, as plain sampling applies them: row i follows the sequence and the first i drafts
     * (s->seq holds the sequence, the pending tokens included); put back before anyone else reads the rows */
    struct pymoe_row_patch patches[PYMOE_SPEC_MAX_DRAFT + 1];
    int32_t                n_patched = 0;
    for (; rc == PYMOE_OK && pymoe_sampling_changes_logits(&s->sampling) && n_patched <= r->n_draft; n_patched++) {
        rc = pymoe_row_patch((float *) logits + (size_t) n_patched * (size_t) s->n_vocab, s->n_vocab, &s->sampling,
                             false, s->seq, s->n_seq, r->drafts, n_patched, &patches[n_patched]);
    }
    n_patched -= rc != PYMOE_OK;  /* a failed patch changed nothing */
    rc = rc == PYMOE_OK ? decide(s, r, logits) : rc;
    while (n_patched > 0) {
        pymoe_row_unpatch(&patches[--n_patched]);
    }
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

/* The verdict on the verify rows: how many drafts stay, and the next token. */
static int32_t decide(pymoe_spec * s, struct round * r, const float * logits) {
    const size_t  V    = (size_t) s->n_vocab;
    const int32_t n_tp = s->n_t_pending;
    int32_t       rc   = PYMOE_OK;
    double t_verifier = r->t_verified;
    if (s->greedy && s->grammar) {
        rc = verify_constrained(s, r, logits, NULL);
        t_verifier = pymoe_now();
        s->stats.target_sampling_seconds += t_verifier - r->t_verified;
    } else if (s->greedy) {
        rc = pymoe_verify(PYMOE_VERIFY_GREEDY, r->drafts, r->n_draft, NULL, logits, s->n_vocab, NULL, &r->n_accepted,
                          &r->next);
        if (rc == PYMOE_ENUMERIC || rc == PYMOE_EINVAL) {  /* a row it could not use: which position */
            char why[512];
            snprintf(why, sizeof why, "%s", pymoe_last_error());
            return pymoe_fail(rc, "the target's verify batch from position %d: %s", r->t_first + n_tp, why);
        }
    } else {
        /* A target row past the first rejected draft is never read: its distribution is not worked out (rows
         * are read from memory, 600 kB each at 152k tokens); the uniforms are drawn all the same. */
        struct pymoe_sparse_row q[PYMOE_SPEC_MAX_DRAFT], p[PYMOE_SPEC_MAX_DRAFT + 1];
        rc = s->grammar ? verify_constrained(s, r, logits, p) : PYMOE_OK;
        bool rejected = false;
        for (int32_t i = 0; rc == PYMOE_OK && i <= r->n_draft; i++) {
            float top;
            if (rejected) {
                p[i] = (struct pymoe_sparse_row) { NULL, NULL, 0 };
            } else if (!s->grammar) {
                rc = dist_from_logits(&s->p[i], logits + i * V, s->n_vocab, &s->sampling, s->scratch, &top);
                if (PYMOE_ROW_UNUSABLE(rc)) {
                    return row_error(rc, "target", r->t_first + n_tp + i);
                }
                if (rc != PYMOE_OK) {
                    return rc;
                }
                p[i] = (struct pymoe_sparse_row) { s->p[i].ids, s->p[i].p, s->p[i].n };
            }
            if (i < r->n_draft && s->sources[r->source].ops->deterministic) {  /* a certain draft: q is one-hot */
                q[i] = (struct pymoe_sparse_row) { &r->drafts[i], &ONE, 1 };
            } else if (i < r->n_draft) {
                q[i] = (struct pymoe_sparse_row) { s->q[i].ids, s->q[i].p, s->q[i].n };
            }
            s->u[i] = pymoe_rng_uniform(&s->rng);
            rejected = rejected || (i < r->n_draft && !pymoe_sparse_accepts(r->drafts[i], &q[i], &p[i], s->u[i]));
        }
        if (rc != PYMOE_OK) {
            return rc;
        }
        t_verifier = pymoe_now();
        s->stats.target_sampling_seconds += t_verifier - r->t_verified;
        rc = pymoe_verify_sparse_rows(r->drafts, r->n_draft, q, p, s->u, &r->n_accepted, &r->next);
    }
    s->stats.verifier_seconds += pymoe_now() - t_verifier;
    return rc;
}

/* Drop the rejected drafts from the target. With a checkpoint (saved when
 * snapshots could not cover n_draft) and more rejected than a snapshot can
 * take back: restore it, and queue what it forgot (the batch's accepted part
 * and next) to be evaluated with the next batch (draft_room makes a round
 * plain when that backlog outgrows a draft, which clears it). Either way next joins the target's pending tokens. */
static int32_t target_rollback(pymoe_spec * s, struct round * r) {
    const int32_t rejected = r->n_draft - r->n_accepted;
    const double  t        = pymoe_now();
    int32_t       rc       = PYMOE_OK;
    if (rejected == 0) {
        s->n_t_pending = 0;
    } else if (!r->saved || rejected <= pymoe_session_rewind_limit(s->target)) {
        rc = pymoe_owned_rewind(s->target, rejected);
        s->n_t_pending = 0;
    } else {
        rc = pymoe_owned_restore(s->target);
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

/* Between verify and roll back, while the batch's rows are there: each token
 * the round emits, scored by the row that chose it (row i chose out[i]). */
static int32_t score_step(pymoe_spec * s, struct round * r) {
    const size_t  V = (size_t) s->n_vocab;
    const int32_t n = r->n_accepted + !pymoe_model_token_is_eog(s->target->model, r->next);
    for (int32_t i = 0; i < n; i++) {
        const pymoe_token t  = i < r->n_accepted ? r->drafts[i] : r->next;
        const int32_t     rc = pymoe_logprob_with(s->target->logits + i * V, s->n_vocab, t, s->logprobs_top,
                                                  s->scratch, &s->logprobs[i]);
        if (rc != PYMOE_OK) {
            return PYMOE_ROW_UNUSABLE(rc) ? row_error(rc, "target", r->t_first + s->n_t_pending + i) : rc;
        }
    }
    s->n_logprobs = n;
    return PYMOE_OK;
}

/* Step 3, roll back: every source takes the verdict (what joins the
 * sequence, what goes), then the target drops what was rejected; the
 * sequence has grown by the accepted drafts and next, unless next ends the
 * generation: as a plain session does, the sequence then ends before it (it
 * was the last token the caches still had to evaluate). */
static int32_t rollback_step(pymoe_spec * s, struct round * r, pymoe_token * out) {
    memcpy(out, r->drafts, sizeof(*out) * (size_t) r->n_accepted);  /* before the target's rollback reuses the batch */
    out[r->n_accepted] = r->next;
    r->ends            = pymoe_model_token_is_eog(s->target->model, r->next);
    const double t     = pymoe_now();
    int32_t      rc    = PYMOE_OK;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        rc = s->sources[i].ops->accept(s, s->sources[i].state, r, out);
    }
    rc = rc == PYMOE_OK ? target_rollback(s, r) : rc;
    for (int32_t i = 0; rc == PYMOE_OK && s->grammar && i < r->n_accepted + !r->ends; i++) {
        rc = pymoe_grammar_accept(s->grammar, out[i]);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    memcpy(s->seq + s->n_seq, out, sizeof(*out) * (size_t) (r->n_accepted + 1));  /* within the target's batch room */
    s->n_seq += r->n_accepted + !r->ends;
    s->n_t_pending -= r->ends;
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
    const bool copied = r->source >= 0 && s->sources[r->source].ops->kind == PYMOE_DRAFT_LOOKUP;
    for (int32_t i = 1; !copied && i <= r->n_draft && i <= r->n_accepted + 1; i++) {
        st->depth_drafted[i] += 1;  /* drafts after the first rejection were never tested */
        st->depth_accepted[i] += i <= r->n_accepted;
    }
    if (copied) {
        st->lookup_rounds[r->match_length] += 1;
        st->lookup_drafted[r->match_length] += r->n_draft;
        st->lookup_accepted[r->match_length] += r->n_accepted;
    }
    cost->source         = r->source >= 0 ? s->sources[r->source].ops->kind : 0;
    cost->lookup_arm     = r->lookup_arm;
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
    *n_out        = 0;
    *stop         = PYMOE_STOP_NONE;
    s->n_logprobs = 0;
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
    if (max_tokens < 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_step: max_tokens must be >= 0, got %d", max_tokens);
    }
    if (max_tokens == 0) {
        *stop = PYMOE_STOP_MAX_TOKENS;
        return pymoe_ok();
    }
    if (s->target->pos + s->n_t_pending > s->target->n_ctx) {
        *stop = PYMOE_STOP_CONTEXT_FULL;
        return pymoe_ok();
    }
    /* room in every source for what the round may add, before anything that cannot be taken back */
    int32_t rc = PYMOE_OK;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        rc = s->sources[i].ops->reserve ? s->sources[i].ops->reserve(s, s->sources[i].state,
                                                                     s->params.draft_max + 1) : PYMOE_OK;
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct round r  = { .source = -1, .t_start = pymoe_now() };
    rc              = draft_step(s, &r, max_tokens);
    rc              = rc == PYMOE_OK ? verify_step(s, &r) : rc;
    rc              = rc == PYMOE_OK && s->logprobs_top >= 0 ? score_step(s, &r) : rc;
    rc              = rc == PYMOE_OK ? rollback_step(s, &r, out) : rc;
    if (rc != PYMOE_OK) {
        s->n_logprobs = 0;
        s->broken     = true;  /* a decode failed halfway through the round: the caches no longer match */
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
    if (max_tokens < 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_run: max_tokens must be >= 0, got %d", max_tokens);
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
    struct pymoe_spec_stats full = s->stats;
    int32_t rc = pymoe_struct_out(out, &full, sizeof(full), offsetof(struct pymoe_spec_stats, rounds),
                                  "pymoe_spec_stats");
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

/* A loop's state: this header, the sequence, then the target session's
 * state and each source's part (its own save's bytes). The pending tokens
 * are the sequence after what each cache holds, and are not stored. What
 * auto has learned is not part of it: it belongs to the models and the
 * machine, not to a sequence (the loop that loads keeps its own;
 * pymoe_spec_learned_save carries it). */
struct loop_state_header {
    char     magic[8];  /* "PYMOEL01" */
    int32_t  sources;
    int32_t  n_seq;
    uint64_t target_bytes;
    uint64_t source_bytes[PYMOE_MAX_SOURCES];
};
static const char LOOP_STATE_MAGIC[8] = { 'P', 'Y', 'M', 'O', 'E', 'L', '0', '1' };

static size_t source_state_size(pymoe_spec * s, int32_t i) {
    const struct draft_source * ops = s->sources[i].ops;
    return ops->state_size ? ops->state_size(s, s->sources[i].state) : 0;
}

int32_t pymoe_spec_state_save(pymoe_spec * s, uint8_t * buf, size_t capacity, size_t * n_out) {
    if (!s || !n_out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_state_save: NULL argument");
    }
    if (s->broken) {
        return refuse_broken();
    }
    struct loop_state_header h;
    memset(&h, 0, sizeof(h));
    memcpy(h.magic, LOOP_STATE_MAGIC, sizeof(h.magic));
    h.sources  = s->params.draft_sources;
    h.n_seq    = s->n_seq;
    size_t got = 0;
    int32_t rc = pymoe_session_state_save(s->target, NULL, 0, &got);
    if (rc != PYMOE_OK) {
        return rc;
    }
    h.target_bytes = got;
    size_t total   = sizeof(h) + sizeof(pymoe_token) * (size_t) h.n_seq + h.target_bytes;
    for (int32_t i = 0; i < s->n_sources; i++) {
        h.source_bytes[i] = source_state_size(s, i);
        total += h.source_bytes[i];
    }
    *n_out = total;
    if (!buf) {
        return pymoe_ok();
    }
    if (capacity < total) {
        return pymoe_fail(PYMOE_ENOSPACE, "the loop's state needs %zu bytes, the buffer has %zu", total, capacity);
    }
    uint8_t * at = buf;
    memcpy(at, &h, sizeof(h));
    at += sizeof(h);
    memcpy(at, s->seq, sizeof(pymoe_token) * (size_t) h.n_seq);
    at += sizeof(pymoe_token) * (size_t) h.n_seq;
    rc = pymoe_session_state_save(s->target, at, h.target_bytes, &got);
    at += h.target_bytes;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const struct draft_source * ops = s->sources[i].ops;
        rc = ops->state_save ? ops->state_save(s, s->sources[i].state, at, h.source_bytes[i]) : PYMOE_OK;
        at += h.source_bytes[i];
    }
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

int32_t pymoe_spec_state_load(pymoe_spec * s, const uint8_t * buf, size_t size) {
    if (!s || !buf) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_spec_state_load: NULL argument");
    }
    struct loop_state_header h;
    if (size < sizeof(h)) {
        return pymoe_fail(PYMOE_EINVAL, "%zu bytes is too short to be a saved loop state", size);
    }
    memcpy(&h, buf, sizeof(h));
    if (memcmp(h.magic, LOOP_STATE_MAGIC, sizeof(h.magic)) != 0) {
        return pymoe_fail(PYMOE_EINVAL, "not a pymoe loop state (bad magic)");
    }
    if (h.sources != s->params.draft_sources) {
        return pymoe_fail(PYMOE_EINVAL, "the saved state is of a loop with draft sources %d, this one has %d",
                          h.sources, s->params.draft_sources);
    }
    uint64_t parts = h.target_bytes;
    bool     sane  = h.n_seq >= 0 && h.n_seq <= s->target->n_ctx && h.target_bytes <= size;
    for (int32_t i = 0; i < PYMOE_MAX_SOURCES; i++) {
        sane = sane && h.source_bytes[i] <= size && (i < s->n_sources || h.source_bytes[i] == 0);
        parts += sane ? h.source_bytes[i] : 0;
    }
    if (!sane || size != sizeof(h) + sizeof(pymoe_token) * (size_t) h.n_seq + parts) {
        return pymoe_fail(PYMOE_EINVAL, "the saved loop state is damaged (%zu bytes)", size);
    }
    const uint8_t * seq    = buf + sizeof(h);
    const uint8_t * target = seq + sizeof(pymoe_token) * (size_t) h.n_seq;
    int32_t         rc     = pymoe_owned_state_load(s->target, target, h.target_bytes);
    if (rc == PYMOE_EINVAL) {
        return rc;  /* another model's, or damaged: refused before anything changed */
    }
    /* from here on the loop has changed: a failure leaves it empty (reset), never half loaded */
    if (rc == PYMOE_OK) {
        memcpy(s->seq, seq, sizeof(pymoe_token) * (size_t) h.n_seq);
        s->n_seq       = h.n_seq;
        s->n_t_pending = h.n_seq - s->target->pos;
        const int32_t batch = s->target->n_batch < s->batch_cap ? s->target->n_batch : s->batch_cap;
        const bool fits = s->n_t_pending >= 0 && s->n_t_pending <= batch &&  /* 0: it ended (or is empty) */
                          memcmp(s->target->tokens, s->seq, sizeof(pymoe_token) * (size_t) s->target->pos) == 0 &&
                          pymoe_check_tokens(s->target->model, s->seq, s->n_seq) == PYMOE_OK;
        rc = fits ? PYMOE_OK
                  : pymoe_fail(PYMOE_EINVAL, "the saved loop state is damaged: its sequence and its target's differ");
    }
    if (rc == PYMOE_OK) {
        memcpy(s->t_pending, s->seq + s->target->pos, sizeof(pymoe_token) * (size_t) s->n_t_pending);
    }
    const uint8_t * at = target + h.target_bytes;
    for (int32_t i = 0; rc == PYMOE_OK && i < s->n_sources; i++) {
        const struct draft_source * ops = s->sources[i].ops;
        rc = ops->state_load ? ops->state_load(s, s->sources[i].state, at, h.source_bytes[i]) : PYMOE_OK;
        at += h.source_bytes[i];
    }
    s->broken = false;
    rc = rc == PYMOE_OK ? check_in_step(s, "a state load") : rc;
    if (rc != PYMOE_OK) {
        char why[512];
        snprintf(why, sizeof(why), "%s", pymoe_last_error());
        pymoe_spec_reset(s);
        return pymoe_fail(rc, "%s (the loop is now empty)", why);
    }
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
static const char LEARNED_TAG[16] = "pymoe-learned-3";  /* 2: the chooser keyed by source; 3: idle sources */

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
