/* draft_length.h - the auto draft-length chooser (internal; pure, no llama.cpp). */
#ifndef PYMOE_DRAFT_LENGTH_H
#define PYMOE_DRAFT_LENGTH_H

#include "pymoe.h"

/* The largest verify batch (the tokens evaluated again after a checkpoint
 * restore, the newest token and the drafts). llama.cpp copies a host-resident
 * weight to the GPU for an op of a batch of 32 tokens or more
 * (GGML_OP_OFFLOAD_MIN_BATCH, op_offload): right for prompts, ruinous for a
 * verify batch on a MoE whose experts live in RAM. So verify batches stay
 * below it (and below a smaller GGML_OP_OFFLOAD_MIN_BATCH, if one is set). */
enum { PYMOE_SPEC_MAX_BATCH = 31 };
_Static_assert(PYMOE_SPEC_MAX_DRAFT + 1 <= PYMOE_SPEC_MAX_BATCH, "a full draft fits in a verify batch");

/* What a lookup round's acceptance is learned by: the match length of a
 * fresh match (1..PYMOE_NGRAM_MAX; a long match in copied text is accepted
 * far more often than a short one in free text), or PYMOE_LOOKUP_CONTINUES:
 * the round after a lookup round whose drafts were all accepted, where a
 * copy is under way and usually goes on. */
enum { PYMOE_LOOKUP_CONTINUES = PYMOE_NGRAM_MAX + 1 };

/* Rounds without drafting after which a source's unnamed time (what no
 * component of its rounds names) fades toward plain rounds', so that one slow
 * round does not keep it from drafting for good. */
enum { PYMOE_SOURCE_IDLE_ROUNDS = 64 };

struct pymoe_draft_length {
    int32_t k_max;
    /* rollback: the target takes back up to target_rewind rejected drafts
     * directly (KV cache: all; snapshots: n_rs_seq; else 0) and needs a
     * checkpoint for rounds drafting more; a draft with checkpoints saves one
     * in rounds that feed it drafts (k >= 2) */
    int32_t target_rewind;
    bool    draft_checkpoints;
    /* the source whose drafts cost draft time (enum pymoe_draft_source:
     * PYMOE_DRAFT_MODEL, or PYMOE_DRAFT_MTP, whose head evaluates again each
     * round the tokens accepted since the last, from the target's hidden
     * states, and k - 1 drafts; 0: lookup alone) */
    int32_t model_source;
    double  save_mean[2], restore_mean[2];  /* seconds per save and per restore: [0] target, [1] draft */
    int64_t save_count[2], restore_count[2];
    int64_t rounds;
    double  draft_mean;  /* seconds per token the draft evaluates */
    int64_t draft_count;
    double  verify_mean[PYMOE_SPEC_MAX_BATCH + 1];  /* seconds per target batch, by batch size */
    int64_t verify_count[PYMOE_SPEC_MAX_BATCH + 1];
    double  row_mean;    /* seconds of other work per verified row */
    int64_t row_count;
    double  drift;        /* drafting rounds' model time measured / predicted, recent: the averages' lag */
    double  unnamed_mean[3];   /* seconds of a round no component names, by what drafted it (unnamed_slot):
                                  [0] nothing (plain), [1] the model source, [2] lookup */
    int64_t unnamed_count[3];
    int64_t unnamed_seen[3];   /* the round each was last measured in */
    /* The gate: whole rounds measured per draft length, which the cost
     * model above only predicts. Drafting that has not measurably paid
     * may lose at most a small share of the time run so far. */
    struct pymoe_whole_rounds {
        double n, tokens, seconds, tokens2, seconds2, cross;  /* decayed sums over rounds */
    } whole[PYMOE_SPEC_MAX_DRAFT + 1];
    bool    warm;         /* started from what an earlier loop learned (no warm-up rounds) */
    double  elapsed;      /* seconds of all rounds measured */
    double  probe_loss;   /* seconds probes took beyond what plain decoding takes for their tokens */
    bool    probing;      /* the round just chosen is a probe: an exploration, or a k that measurably lost */
    int64_t last_plain;   /* round index of the last plain round */
    int64_t gated;        /* rounds the model chose k > 0 for and the gate made plain */
    double  acc_num, acc_den;  /* decayed counts: accepted draft tokens / acceptance tests */
    /* the same per depth (the i-th draft token of a round, tested only when
     * all before it were accepted): a draft run on its own output, an MTP
     * head above all, is accepted less often the deeper it drafts */
    double  depth_num[PYMOE_SPEC_MAX_DRAFT + 1], depth_den[PYMOE_SPEC_MAX_DRAFT + 1];
    int32_t last_best;         /* exploration schedule: */
    int64_t next_explore, explore_every;
    bool    explore_up;
    /* Drafts copied from the context: acceptance and whole rounds per arm
     * (enum pymoe_lookup_arm), each with what all arms measured as prior. */
    struct pymoe_lookup_arm {
        double  acc_num, acc_den;
        struct pymoe_whole_rounds whole;
        int32_t longest;  /* the most drafts one of its rounds had accepted: how far probes may reach */
    } lookup[PYMOE_LOOKUP_CONTINUES + 1];
    double  lookup_num, lookup_den;
};

/* What one round measured. */
struct pymoe_round_cost {
    int32_t n_draft;       /* draft tokens verified */
    int32_t n_accepted;
    int32_t draft_tokens;  /* tokens the draft evaluated (catch-up + drafts fed back) */
    int32_t catchup_tokens; /* tokens the draft's first decode caught up on (more after plain rounds) */
    int32_t extra_tests;    /* acceptance tests observed outside drafting, and how many passed */
    int32_t extra_passed;
    int32_t batch_tokens;   /* target batch: tokens evaluated again after a restore + 1 + n_draft */
    int32_t source;         /* what drafted it: enum pymoe_draft_source (0: a plain round) */
    int32_t lookup_arm;     /* a round drafted by lookup: its arm */
    double  draft_seconds;
    double  verify_seconds;
    double  other_seconds;
    double  round_seconds;  /* the whole round, wall clock: may hold costs no component names */
    double  target_save_seconds, draft_save_seconds;       /* 0: none this round */
    double  target_restore_seconds, draft_restore_seconds;
};

void    pymoe_draft_length_init(struct pymoe_draft_length * d, int32_t k_max);
int32_t pymoe_draft_length_choose(struct pymoe_draft_length * d);
void    pymoe_draft_length_update(struct pymoe_draft_length * d, const struct pymoe_round_cost * c);
double  pymoe_draft_length_acceptance(const struct pymoe_draft_length * d);
/* What auto believes the i-th draft token's acceptance is (1 <= i <= PYMOE_SPEC_MAX_DRAFT),
 * given that the ones before it were accepted. */
double  pymoe_draft_length_depth_acceptance(const struct pymoe_draft_length * d, int32_t i);
/* Expected tokens per second at draft length k under the current estimates. */
double  pymoe_draft_length_rate(const struct pymoe_draft_length * d, int32_t k);
/* What whole rounds measured at k > 0 against plain rounds: +1 measurably
 * faster, -1 measurably slower, 0 not known (too few rounds or too much noise). */
int32_t pymoe_draft_length_verdict(const struct pymoe_draft_length * d, int32_t k);

/* The draft length for a lookup proposal of this arm (0: decode plainly, or
 * let a draft model try), at most k_max: the same cost model with no draft
 * cost, the arm's acceptance, and the same gate, on whole rounds of the arm. */
int32_t pymoe_draft_length_choose_lookup(struct pymoe_draft_length * d, int32_t arm, int32_t k_max);
double  pymoe_draft_length_lookup_acceptance(const struct pymoe_draft_length * d, int32_t arm);

/* What an earlier loop learned (its chooser's state, from bytes that
 * outlived it: untrusted). Fits when it was learned with the same k_max and
 * rollback shape, and every figure in it is one a run can produce. */
bool    pymoe_draft_length_learned_fits(const struct pymoe_draft_length * d, const struct pymoe_draft_length * learned);
/* Start d from it: the costs (verify curve, draft, rows, rollback, what no
 * component names), a draft's acceptance and whole-round verdicts (not
 * lookup's: those belong to the text), each worth only a few rounds, so that
 * this run's own measurements soon outweigh it; the schedule (exploration,
 * probe budget, drift) starts afresh. */
void    pymoe_draft_length_warm_start(struct pymoe_draft_length * d, const struct pymoe_draft_length * learned);

#endif
