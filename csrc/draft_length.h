/* draft_length.h - the auto draft-length chooser (internal; pure, no llama.cpp). */
#ifndef PYMOE_DRAFT_LENGTH_H
#define PYMOE_DRAFT_LENGTH_H

#include "pymoe.h"

struct pymoe_draft_length {
    int32_t k_max;
    int64_t rounds;
    double  draft_mean;  /* seconds per token the draft evaluates */
    int64_t draft_count;
    double  verify_mean[PYMOE_SPEC_MAX_DRAFT + 2];  /* seconds per target batch, by batch size */
    int64_t verify_count[PYMOE_SPEC_MAX_DRAFT + 2];
    double  row_mean;    /* seconds of other work per verified row */
    int64_t row_count;
    double  acc_num, acc_den;  /* decayed counts: accepted draft tokens / acceptance tests */
    int32_t last_best;         /* exploration schedule: */
    int64_t next_explore, explore_every;
    bool    explore_up;
};

/* What one round measured. */
struct pymoe_round_cost {
    int32_t n_draft;       /* draft tokens verified */
    int32_t n_accepted;
    int32_t draft_tokens;  /* tokens the draft evaluated (catch-up + drafts fed back) */
    int32_t catchup_tokens; /* tokens the draft's first decode caught up on (more after plain rounds) */
    int32_t extra_tests;    /* acceptance tests observed outside drafting, and how many passed */
    int32_t extra_passed;
    double  draft_seconds;
    double  verify_seconds;
    double  other_seconds;
};

void    pymoe_draft_length_init(struct pymoe_draft_length * d, int32_t k_max);
int32_t pymoe_draft_length_choose(struct pymoe_draft_length * d);
void    pymoe_draft_length_update(struct pymoe_draft_length * d, const struct pymoe_round_cost * c);
double  pymoe_draft_length_acceptance(const struct pymoe_draft_length * d);
/* Expected tokens per second at draft length k under the current estimates. */
double  pymoe_draft_length_rate(const struct pymoe_draft_length * d, int32_t k);

#endif
