/* source_mtp.c - the target's own MTP head drafts (mtp.c runs the head). It
 * holds the sequence but for the tokens waiting in its queue, and takes the
 * target's hidden states of every batch the target evaluates: a feed's
 * chunks, and a verify batch's accepted part. Rejected drafts never reach
 * its cache, so the target's rollback is the loop's business. */
#include "spec_loop.h"

/* Past this many tokens waiting, the head catches up even in a round it
 * does not draft in: its queue holds a hidden state per token. */
enum { MTP_BACKLOG = 64 };

static int32_t open_mtp(pymoe_spec * s, void ** state) {
    struct pymoe_mtp * m  = NULL;
    int32_t            rc = pymoe_mtp_attach(s->target, &m);
    if (rc == PYMOE_OK) {
        s->chooser.model_source = PYMOE_DRAFT_MTP;
        *state = m;
    }
    return rc;
}

/* The head stays with the target's session (which frees it): nothing to close. */
static void close_mtp(void * state) { (void) state; }

static int32_t reserve(pymoe_spec * s, void * state, int32_t n) {
    (void) s;
    return pymoe_mtp_reserve(state, n, PYMOE_SPEC_MAX_BATCH);
}

static int32_t feed(pymoe_spec * s, void * state, const pymoe_token * tokens, int32_t n) {
    (void) s;
    pymoe_mtp_add_tokens(state, tokens, n, false);  /* reserved */
    return PYMOE_OK;
}

/* A chunk of a feed: the hidden states join the queue, and the head catches
 * up on them, so that its queue stays within a chunk. */
static int32_t target_fed(pymoe_spec * s, void * state, int32_t first, int32_t n) {
    int32_t evaluated = 0;
    int32_t rc        = pymoe_mtp_reserve(state, 0, n);
    rc                = rc == PYMOE_OK ? pymoe_mtp_add_rows(state, first, n) : rc;
    rc                = rc == PYMOE_OK ? pymoe_mtp_catch_up(state, &evaluated, NULL) : rc;
    s->stats.mtp_tokens += evaluated;
    return rc;
}

/* It catches up on the tokens accepted since it last ran (the newest one's
 * logits propose d_1), then runs on its own drafts for d_2..d_k; those
 * entries are dropped again (the target's hidden states replace them). A
 * round another source drafts in only catches up on a long backlog.
 * Greedy auto learns the head's acceptance from a catch-up over plain rounds
 * too (as a draft model's catch-up does), or a few unlucky first drafts
 * would leave it guessing for the rest of a generation. */
static int32_t propose(pymoe_spec * s, void * state, struct round * r, int32_t room) {
    struct pymoe_mtp *     m     = state;
    int32_t                rc    = PYMOE_OK;
    const int32_t          k     = r->source >= 0 ? 0 : pymoe_spec_draft_length(s, room);
    const bool             learn = s->greedy && s->params.auto_draft;
    struct pymoe_mtp_tests tests = { s->n_common, 0, 0 };
    if (k > 0) {
        const double  t         = pymoe_now();
        int32_t       evaluated = 0;
        const float * row       = NULL;
        rc = pymoe_mtp_first(m, &row, &evaluated, learn && s->stats.last_k == 0 ? &tests : NULL);
        r->cost.catchup_tokens = evaluated;
        r->k                   = row ? k : 0;  /* no row: the newest token has no hidden state yet, a plain round */
        for (int32_t i = 0; rc == PYMOE_OK && i < r->k; i++) {
            pymoe_token d;
            bool        sure = false;
            rc = pymoe_spec_pick_draft(s, row, i, &d, &sure);
            if (rc != PYMOE_OK || !sure) {
                break;
            }
            s->batch[1 + r->n_draft++] = d;
            if (i + 1 < r->k) {
                rc = pymoe_mtp_next(m, d, &row);
                r->in_cache = i + 1;
            }
        }
        rc = rc == PYMOE_OK ? pymoe_mtp_drop_drafts(m) : rc;
        s->stats.mtp_tokens += evaluated + r->in_cache;
        s->stats.mtp_seconds += pymoe_now() - t;
    }
    if (rc == PYMOE_OK && pymoe_mtp_backlog(m) >= MTP_BACKLOG) {
        int32_t evaluated = 0;
        rc = pymoe_mtp_catch_up(m, &evaluated, learn ? &tests : NULL);
        s->stats.mtp_tokens += evaluated;
    }
    r->cost.extra_tests += tests.tests;
    r->cost.extra_passed += tests.passed;
    return rc;
}

/* The hidden states of the batch's accepted part (read before the target's
 * rollback could touch them), and the tokens that joined the sequence. */
static int32_t accept(pymoe_spec * s, void * state, struct round * r, const pymoe_token * out) {
    int32_t rc = pymoe_mtp_add_rows(state, r->t_first, r->n_batch - r->n_draft + r->n_accepted);
    const bool drafted = r->n_draft > 0 && r->source >= 0 && s->sources[r->source].state == state;
    pymoe_mtp_add_tokens(state, out, r->n_accepted + !r->ends, drafted);  /* reserved by the round */
    return rc;
}

static int32_t cut_to(pymoe_spec * s, void * state, int32_t n_keep) {
    (void) s;
    return pymoe_mtp_rewind(state, n_keep);
}

static int32_t clear(pymoe_spec * s, void * state) {
    (void) s;
    pymoe_mtp_clear(state);
    return PYMOE_OK;
}

static int32_t position(const pymoe_spec * s, const void * state) {
    (void) s;
    return pymoe_mtp_position(state);
}

static size_t state_size(pymoe_spec * s, void * state) {
    (void) s;
    return pymoe_mtp_state_size(state);
}

static int32_t state_save(pymoe_spec * s, void * state, uint8_t * buf, size_t size) {
    (void) s;
    return pymoe_mtp_state_save(state, buf, size);
}

static int32_t state_load(pymoe_spec * s, void * state, const uint8_t * buf, size_t size) {
    return pymoe_mtp_state_load(state, buf, size, s->seq, s->n_seq);
}

const struct draft_source pymoe_mtp_source = {
    .name = "MTP head", .kind = PYMOE_DRAFT_MTP, .deterministic = false,
    .open = open_mtp, .close = close_mtp, .reserve = reserve, .feed = feed, .target_fed = target_fed,
    .propose = propose, .accept = accept, .rewind = cut_to, .clear = clear, .position = position,
    .state_size = state_size, .state_save = state_save, .state_load = state_load,
};
