/* source_lookup.c - drafts copied from the context: the longest earlier
 * match of the sequence's end proposes what followed it there (ngram.c's
 * index over the sequence). auto decides how much of it to verify from what
 * matches of that length were worth; no match (or one too short to pay)
 * leaves the round to the next source, or to plain decoding. Its drafts are
 * certain (one-hot), and it keeps nothing a state must carry: a load
 * rebuilds the index from the sequence. */
#include "ngram.h"
#include "spec_loop.h"

#include <stdlib.h>

struct lookup {
    struct pymoe_ngram index;
    bool               copying;  /* the last round's lookup drafts were all accepted: a copy is under way */
};

static int32_t full(const struct lookup * l, int32_t n) {
    return pymoe_fail(PYMOE_ENOMEM, "out of memory for the lookup index (%d tokens and %d more)", l->index.n, n);
}

/* The index over the first n tokens of seq, and no copy under way. */
static int32_t rebuild(struct lookup * l, const pymoe_token * seq, int32_t n) {
    pymoe_ngram_clear(&l->index);
    l->copying = false;
    return pymoe_ngram_reserve(&l->index, n) == PYMOE_OK ? pymoe_ngram_append(&l->index, seq, n) : full(l, n);
}

static int32_t open_lookup(pymoe_spec * s, void ** state) {
    const struct pymoe_spec_params * p = &s->params;
    if (!(p->ngram_min >= 1 && p->ngram_min <= p->ngram_max && p->ngram_max <= PYMOE_NGRAM_MAX)) {
        return pymoe_fail(PYMOE_EINVAL, "lookup drafts need 1 <= ngram_min <= ngram_max <= %d, got ngram_min %d, "
                          "ngram_max %d", PYMOE_NGRAM_MAX, p->ngram_min, p->ngram_max);
    }
    struct lookup * l = calloc(1, sizeof(*l));
    if (!l || pymoe_ngram_init(&l->index, p->ngram_min, p->ngram_max) != PYMOE_OK) {
        free(l);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    *state = l;
    return PYMOE_OK;
}

static void close_lookup(void * state) {
    struct lookup * l = state;
    if (l) {
        pymoe_ngram_free(&l->index);
        free(l);
    }
}

static int32_t reserve(pymoe_spec * s, void * state, int32_t n) {
    (void) s;
    struct lookup * l = state;
    return pymoe_ngram_reserve(&l->index, n) == PYMOE_OK ? PYMOE_OK : full(l, n);
}

static int32_t feed(pymoe_spec * s, void * state, const pymoe_token * tokens, int32_t n) {
    (void) s;
    struct lookup * l = state;
    return pymoe_ngram_append(&l->index, tokens, n);  /* reserved: cannot fail */
}

static int32_t propose(pymoe_spec * s, void * state, struct round * r, int32_t room) {
    struct lookup * l = state;
    if (r->source >= 0 || room <= 0) {
        return PYMOE_OK;
    }
    int32_t       length = 0;
    const int32_t n      = pymoe_ngram_lookup(&l->index, room, s->batch + 1, &length);
    if (n == 0) {
        return PYMOE_OK;
    }
    s->stats.lookup_matches[length] += 1;
    const int32_t arm = l->copying ? PYMOE_LOOKUP_CONTINUES : length;
    const int32_t k   = s->params.auto_draft ? pymoe_draft_length_choose_lookup(&s->chooser, arm, n) : n;
    if (k > 0) {
        r->k            = k;
        r->n_draft      = k;
        r->match_length = length;
        r->lookup_arm   = arm;
    }
    return PYMOE_OK;
}

static int32_t accept(pymoe_spec * s, void * state, struct round * r, const pymoe_token * out) {
    struct lookup * l = state;
    const bool      mine = r->source >= 0 && s->sources[r->source].ops == &pymoe_lookup_source;
    l->copying           = mine && r->n_accepted == r->n_draft && !r->ends;
    return pymoe_ngram_append(&l->index, out, r->n_accepted + !r->ends);  /* room reserved by the round */
}

static int32_t cut_to(pymoe_spec * s, void * state, int32_t n_keep) { return rebuild(state, s->seq, n_keep); }

static int32_t clear(pymoe_spec * s, void * state) { return rebuild(state, s->seq, 0); }

static int32_t position(const pymoe_spec * s, const void * state) {
    (void) s;
    return ((const struct lookup *) state)->index.n;
}

static int32_t state_load(pymoe_spec * s, void * state, const uint8_t * buf, size_t size) {
    (void) buf;
    (void) size;
    return rebuild(state, s->seq, s->n_seq);  /* nothing saved: the sequence is the index's source */
}

const struct draft_source pymoe_lookup_source = {
    .name = "lookup", .kind = PYMOE_DRAFT_LOOKUP, .deterministic = true,
    .open = open_lookup, .close = close_lookup, .reserve = reserve, .feed = feed, .propose = propose,
    .accept = accept, .rewind = cut_to, .clear = clear, .position = position, .state_load = state_load,
};
