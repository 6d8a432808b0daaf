/* source_model.c - a draft model's session drafts: it catches up on the
 * tokens it has not evaluated (`pending`: a few, ending with the newest)
 * and proposes up to k tokens, fixed or auto's choice. Its cache holds the
 * sequence but for the pending tokens; rejected drafts go by removing
 * positions (KV cache) or restoring the checkpoint saved before them
 * (recurrent state: snapshots cover one batch, and it drafts one token per
 * batch). Rounds with k = 0 leave it alone; its pending tokens are caught up
 * in one batch when drafting resumes. */
#include "spec_loop.h"

#include <stdlib.h>
#include <string.h>

struct model {
    pymoe_session * session;
    int32_t         method;  /* enum pymoe_rollback: REMOVE or CHECKPOINT */
    pymoe_token *   pending;
    int32_t         n_pending, cap_pending;
};

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

static int32_t open_model(pymoe_spec * s, void ** state) {
    int32_t rc = check_vocabularies(s->target->model, s->draft->model);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct model * m = calloc(1, sizeof(*m));
    if (m) {
        m->cap_pending = 64;
        m->pending     = malloc(sizeof(*m->pending) * (size_t) m->cap_pending);
    }
    if (!m || !m->pending) {
        free(m);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    m->session = s->draft;
    m->method  = s->draft->recurrent ? PYMOE_ROLLBACK_CHECKPOINT : PYMOE_ROLLBACK_REMOVE;
    s->stats.rollback_draft      = m->method;
    s->chooser.draft_checkpoints = m->method == PYMOE_ROLLBACK_CHECKPOINT;
    s->chooser.model_source      = PYMOE_DRAFT_MODEL;
    *state = m;
    return PYMOE_OK;
}

static void close_model(void * state) {
    struct model * m = state;
    if (m) {
        free(m->pending);
        free(m);
    }
}

/* Room for n more pending tokens. */
static int32_t grow_pending(struct model * m, int32_t n) {
    if (m->n_pending + n > m->cap_pending) {
        int32_t cap = m->cap_pending;
        while (cap < m->n_pending + n) {
            cap *= 2;
        }
        pymoe_token * grown = realloc(m->pending, sizeof(*grown) * (size_t) cap);
        if (!grown) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        m->pending     = grown;
        m->cap_pending = cap;
    }
    return PYMOE_OK;
}

/* Queue tokens the draft has not evaluated. */
static int32_t add_pending(struct model * m, const pymoe_token * tokens, int32_t n) {
    int32_t rc = grow_pending(m, n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    memcpy(m->pending + m->n_pending, tokens, sizeof(*tokens) * (size_t) n);
    m->n_pending += n;
    return PYMOE_OK;
}

static int32_t reserve(pymoe_spec * s, void * state, int32_t n) {
    (void) s;
    return grow_pending(state, n);
}

/* Tokens join the pending ones and the draft evaluates all but the newest
 * now, in one prefill (a feed, or the kept tokens after a rewind), so that the
 * first round after it costs what every round costs. Unless auto has stopped
 * drafting (its last choice was k = 0): then they wait, as a plain
 * round's tokens do, and a server's next turn does not pay for a draft that
 * is not used (measured: 0.9 s on the demo pair after 128 plain rounds). */
static int32_t take_in(const pymoe_spec * s, struct model * m, const pymoe_token * tokens, int32_t n) {
    const bool resting = s->params.auto_draft && s->auto_k == 0;  /* chosen: not only a round without room */
    int32_t    rc      = add_pending(m, tokens, n);
    if (rc != PYMOE_OK || m->n_pending < 2 || resting) {
        return rc;
    }
    rc = pymoe_spec_feed_last(m->session, m->pending, m->n_pending - 1);
    if (rc == PYMOE_OK) {
        m->pending[0] = m->pending[m->n_pending - 1];
        m->n_pending  = 1;
    }
    return rc;
}

/* Both models evaluate a feed at once. */
static int32_t feed(pymoe_spec * s, void * state, const pymoe_token * tokens, int32_t n) {
    struct model *  m    = state;
    pymoe_session * d    = m->session;
    const int32_t   need = d->pos + m->n_pending + n;
    if (need > d->n_ctx) {
        return pymoe_fail(PYMOE_ECONTEXT, "%d tokens do not fit: the sequence would need %d positions of the "
                          "draft's %d", n, need, d->n_ctx);
    }
    int32_t rc = pymoe_check_tokens(d->model, tokens, n);
    return rc == PYMOE_OK ? take_in(s, m, tokens, n) : rc;
}

static int32_t propose(pymoe_spec * s, void * state, struct round * r, int32_t room) {
    struct model *            m    = state;
    pymoe_session *           d    = m->session;
    struct pymoe_round_cost * cost = &r->cost;
    if (r->source >= 0) {
        return PYMOE_OK;
    }
    if (m->n_pending == 0) {  /* it holds the whole sequence (after an end of generation): no row to draft from */
        return PYMOE_OK;
    }
    const int32_t d_room = d->n_ctx - d->pos - m->n_pending + 1;  /* positions left in its context */
    r->k = pymoe_spec_draft_length(s, room < d_room ? room : d_room);
    if (r->k == 0) {
        return PYMOE_OK;
    }
    cost->catchup_tokens = m->n_pending;
    /* Greedy mode: every pending token after the first was the target's
     * choice, so where the draft's argmax matched it the draft would have been
     * accepted. Reading those rows gives the chooser acceptance tests for free
     * after plain rounds (auto k would otherwise learn only from drafting). */
    const bool learn = s->greedy && s->params.auto_draft && m->n_pending > 1 && m->n_pending <= d->n_batch;
    int32_t    rc    = pymoe_owned_feed(d, m->pending, m->n_pending, learn ? 0 : m->n_pending - 1);
    if (rc != PYMOE_OK) {
        return rc;
    }
    for (int32_t i = 0; learn && i + 1 < m->n_pending; i++) {
        const float * row = d->logits + (size_t) i * d->n_vocab;
        cost->extra_tests += 1;
        cost->extra_passed += pymoe_argmax(row, s->n_common) == m->pending[i + 1];
    }
    m->n_pending = 0;
    if (m->method == PYMOE_ROLLBACK_CHECKPOINT && r->k >= 2) {  /* the drafts it is fed may be rejected */
        const double t = pymoe_now();
        rc = pymoe_owned_checkpoint(d);
        if (rc != PYMOE_OK) {
            return rc;
        }
        cost->draft_save_seconds = pymoe_now() - t;
        s->stats.checkpoints += 1;
    }
    for (int32_t i = 0; i < r->k; i++) {
        pymoe_token token;
        bool        sure;
        rc = pymoe_spec_pick_draft(s, d->logits + (size_t) (d->n_logit_rows - 1) * d->n_vocab, i, &token, &sure);
        if (rc != PYMOE_OK) {
            return rc;
        }
        if (!sure) {
            break;  /* the draft is unsure: stop here */
        }
        s->batch[1 + r->n_draft++] = token;
        if (i + 1 < r->k) {
            rc = pymoe_spec_feed_last(d, &token, 1);
            if (rc != PYMOE_OK) {
                return rc;
            }
            r->in_cache = i + 1;
        }
    }
    return PYMOE_OK;
}

/* Drop the rejected drafts: rewind (KV cache) or restore the checkpoint saved
 * before them (recurrent state: all drafts become pending again). Then the
 * accepted drafts it has not evaluated, and next, join the pending tokens. */
static int32_t accept(pymoe_spec * s, void * state, struct round * r, const pymoe_token * out) {
    struct model * m    = state;
    int32_t        keep = r->n_accepted < r->in_cache ? r->n_accepted : r->in_cache;
    const double   t    = pymoe_now();
    int32_t        rc   = PYMOE_OK;
    if (r->in_cache > keep && m->method == PYMOE_ROLLBACK_CHECKPOINT) {
        rc   = pymoe_owned_restore(m->session);
        keep = 0;
        s->stats.restores += 1;
        r->cost.draft_restore_seconds = pymoe_now() - t;
    } else if (r->in_cache > keep) {
        rc = pymoe_owned_rewind(m->session, r->in_cache - keep);
    }
    return rc == PYMOE_OK ? add_pending(m, out + keep, r->n_accepted - keep + !r->ends) : rc;
}

/* It keeps what it can of tokens [0, n_keep - 1) (a draft whose recurrent
 * state cannot go back that far starts over) and evaluates the rest of them
 * now, as a feed does. */
static int32_t cut_to(pymoe_spec * s, void * state, int32_t n_keep) {
    struct model *  m      = state;
    pymoe_session * d      = m->session;
    int32_t         d_keep = d->pos < n_keep - 1 ? d->pos : n_keep - 1;
    int32_t         rc     = PYMOE_OK;
    if (d->pos - d_keep <= pymoe_session_rewind_limit(d)) {
        rc = pymoe_owned_rewind(d, d->pos - d_keep);
    } else {
        rc     = pymoe_owned_reset(d);
        d_keep = 0;
    }
    m->n_pending = 0;
    return rc == PYMOE_OK ? take_in(s, m, s->seq + d_keep, n_keep - d_keep) : rc;
}

static int32_t clear(pymoe_spec * s, void * state) {
    (void) s;
    struct model * m = state;
    m->n_pending     = 0;
    return pymoe_owned_reset(m->session);
}

static int32_t position(const pymoe_spec * s, const void * state) {
    (void) s;
    const struct model * m = state;
    return m->session->pos + m->n_pending;
}

/* Its part of a loop's state is its session's state: the pending tokens are
 * the sequence after what the session holds. */
static size_t state_size(pymoe_spec * s, void * state) {
    (void) s;
    size_t n = 0;
    return pymoe_session_state_save(((struct model *) state)->session, NULL, 0, &n) == PYMOE_OK ? n : 0;
}

static int32_t state_save(pymoe_spec * s, void * state, uint8_t * buf, size_t size) {
    (void) s;
    size_t wrote = 0;
    return pymoe_session_state_save(((struct model *) state)->session, buf, size, &wrote);
}

static int32_t state_load(pymoe_spec * s, void * state, const uint8_t * buf, size_t size) {
    struct model * m  = state;
    int32_t        rc = pymoe_owned_state_load(m->session, buf, size);
    if (rc != PYMOE_OK) {
        return rc;
    }
    const pymoe_session * d = m->session;
    if (d->pos > s->n_seq || memcmp(d->tokens, s->seq, sizeof(*d->tokens) * (size_t) d->pos) != 0) {
        return pymoe_fail(PYMOE_EINVAL, "the saved loop state is damaged: its draft holds another sequence");
    }
    m->n_pending = 0;
    return add_pending(m, s->seq + d->pos, s->n_seq - d->pos);
}

const struct draft_source pymoe_model_source = {
    .name = "draft model", .kind = PYMOE_DRAFT_MODEL, .deterministic = false,
    .open = open_model, .close = close_model, .reserve = reserve, .feed = feed, .propose = propose,
    .accept = accept, .rewind = cut_to, .clear = clear, .position = position, .state_size = state_size,
    .state_save = state_save, .state_load = state_load,
};
