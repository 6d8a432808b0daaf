/* spec_loop.h - the speculative loop's inside (internal): the loop, a round,
 * and the one interface every draft source implements.
 *
 * speculative.c runs the rounds; each draft source lives in a file of its
 * own (source_lookup.c, source_model.c, source_mtp.c) behind struct
 * draft_source, and is registered in speculative.c's SOURCES. A new source
 * is its file, a bit in enum pymoe_draft_source and one line there. */
#ifndef PYMOE_SPEC_LOOP_H
#define PYMOE_SPEC_LOOP_H

#include "draft_length.h"
#include "internal.h"

/* A sampling distribution as the tokens it keeps, ids ascending: what the
 * verifier reads, instead of a full-vocabulary row per draft token. */
struct dist_row {
    pymoe_token * ids;
    float *       p;
    int32_t       n, cap;
};

/* What one round did, step by step; the last step accounts for it. */
struct round {
    int32_t      source;      /* the source that drafted (index into pymoe_spec.sources); -1: a plain round */
    int32_t      k;           /* draft length chosen */
    int32_t      n_draft;     /* drafts proposed: k, or fewer when the source was unsure */
    int32_t      match_length; /* lookup: the match its drafts were copied from */
    int32_t      lookup_arm;   /* lookup: what auto learns their acceptance by (draft_length.h) */
    int32_t      in_cache;    /* drafts the source evaluated itself (the last one it never sees) */
    bool         saved;       /* the target took a checkpoint before the batch */
    int32_t      n_batch;     /* target batch: t_pending + drafts */
    int32_t      t_first;     /* its first position */
    const pymoe_token * drafts;  /* in s->batch, after t_pending */
    int32_t      n_accepted;
    pymoe_token  next;
    bool         ends;        /* next is an end-of-generation token: it does not join the sequence */
    double       t_start, t_drafted, t_batch, t_verified, t_rollback;  /* clock; t_rollback: seconds */
    struct pymoe_round_cost cost;
};

/* A draft source. Every operation gets the loop and the source's own state,
 * and returns a status (with a message: pymoe_fail); a NULL operation is
 * one the source has nothing to do for. Between the loop's calls a source's
 * record of the sequence ends where the sequence does (position). */
struct draft_source {
    const char * name;
    int32_t      kind;           /* its bit of enum pymoe_draft_source */
    bool         deterministic;  /* its drafts are certain: verified as one-hot draft distributions */
    /* Its state for a new loop (s->params, s->target and s->draft are set). */
    int32_t (*open)(pymoe_spec * s, void ** state);
    void    (*close)(void * state);
    /* Room for n more tokens of the sequence (and a round's worth of what
     * comes with them), before anything that cannot be taken back. */
    int32_t (*reserve)(pymoe_spec * s, void * state, int32_t n);
    /* Tokens joined the sequence by a feed (s->seq does not hold them yet);
     * called before the target evaluates them. */
    int32_t (*feed)(pymoe_spec * s, void * state, const pymoe_token * tokens, int32_t n);
    /* The target just evaluated tokens of the sequence from position first:
     * batch indices 0..n-1 of its last decode. */
    int32_t (*target_fed)(pymoe_spec * s, void * state, int32_t first, int32_t n);
    /* Propose up to room drafts into s->batch + 1 (r->n_draft; r->k the
     * length chosen), unless a source asked before drafted (r->source >= 0). */
    int32_t (*propose)(pymoe_spec * s, void * state, struct round * r, int32_t room);
    /* The verdict: out[0..r->n_accepted) and out[n_accepted] (next, unless
     * r->ends) join the sequence; the rest of the round's drafts go. */
    int32_t (*accept)(pymoe_spec * s, void * state, struct round * r, const pymoe_token * out);
    /* The sequence now ends at n_keep (1 <= n_keep <= its length; s->seq
     * holds it). */
    int32_t (*rewind)(pymoe_spec * s, void * state, int32_t n_keep);
    /* An empty sequence. */
    int32_t (*clear)(pymoe_spec * s, void * state);
    /* Where its record of the sequence ends. */
    int32_t (*position)(const pymoe_spec * s, const void * state);
    /* Its part of the loop's state: the size, a save into exactly that many
     * bytes, a load (s->seq and s->n_seq hold the loaded sequence). */
    size_t  (*state_size)(pymoe_spec * s, void * state);
    int32_t (*state_save)(pymoe_spec * s, void * state, uint8_t * buf, size_t size);
    int32_t (*state_load)(pymoe_spec * s, void * state, const uint8_t * buf, size_t size);
};

extern const struct draft_source pymoe_lookup_source;  /* source_lookup.c */
extern const struct draft_source pymoe_model_source;   /* source_model.c */
extern const struct draft_source pymoe_mtp_source;     /* source_mtp.c */

enum { PYMOE_MAX_SOURCES = 2 };  /* lookup, and a draft model or the MTP head */

struct pymoe_spec {
    pymoe_session *          target;
    pymoe_session *          draft;         /* the draft model's session (NULL: none) */
    struct {
        const struct draft_source * ops;
        void *                      state;
    } sources[PYMOE_MAX_SOURCES];           /* in the order a round asks them */
    int32_t                  n_sources;
    struct pymoe_spec_params params;
    struct pymoe_sampling_params sampling;  /* the loop's copy (params.sampling is the caller's, NULL here) */
    struct pymoe_logit_bias *    bias;      /* the loop's copy of sampling.logit_bias */
    bool                     greedy;
    bool                     broken;        /* a failure left the caches out of step with the sequence */
    int32_t                  n_vocab;       /* target's */
    int32_t                  n_common;      /* token ids both models know: the draft samples among these */
    int32_t                  t_method;      /* enum pymoe_rollback, resolved */
    int32_t                  auto_k;        /* auto's last choice before the room cap; -1: none yet */
    uint64_t                 rng;
    pymoe_token *            seq;           /* the sequence: what was fed and emitted, the one record of it */
    int32_t                  n_seq, cap_seq;
    int32_t                  batch_cap;     /* largest verify batch: below llama.cpp's op-offload batch */
    pymoe_token              t_pending[PYMOE_SPEC_MAX_BATCH];
    int32_t                  n_t_pending;
    pymoe_token              batch[PYMOE_SPEC_MAX_BATCH];  /* [t_pending, d_1..d_k] */
    struct dist_row          q[PYMOE_SPEC_MAX_DRAFT];      /* a sampled draft's distributions, kept tokens only */
    struct dist_row          p[PYMOE_SPEC_MAX_DRAFT + 1];  /* the target's */
    pymoe_candidate *        scratch;       /* sampling scratch for max(n_vocab, draft n_vocab) */
    double                   u[PYMOE_SPEC_MAX_DRAFT + 1];
    struct pymoe_spec_stats  stats;
    struct pymoe_draft_length chooser;
    pymoe_grammar *          grammar;       /* the caller's constraint (NULL: none), advanced by each round */
    pymoe_grammar *          draft_walk;    /* the grammar along a model's drafts (pymoe_spec_pick_draft) */
    int32_t                  logprobs_top;  /* pymoe_spec_set_logprobs: n_top, -1 off */
    struct pymoe_logprob     logprobs[PYMOE_SPEC_MAX_DRAFT + 1];  /* the last round's, one per emitted token */
    int32_t                  n_logprobs;
    pymoe_spec_inspect_fn    inspect;
    void *                   inspect_user_data;
};

/* speculative.c, for the sources: */
/* Evaluate tokens on a session of the loop, keeping the last one's logits. */
int32_t pymoe_spec_feed_last(pymoe_session * m, const pymoe_token * tokens, int32_t n);
/* Draft token i from a row of draft logits: the argmax (greedy) or a draw
 * from the row's sampling distribution (kept in s->q[i] for the verifier);
 * *sure is false when the top probability is below draft_p_min. */
int32_t pymoe_spec_pick_draft(pymoe_spec * s, const float * row, int32_t i, pymoe_token * d, bool * sure);
/* The draft length a model-like source drafts this round: fixed, or auto's choice, at most room. */
int32_t pymoe_spec_draft_length(pymoe_spec * s, int32_t room);

#endif
