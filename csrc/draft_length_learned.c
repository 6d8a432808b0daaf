/* draft_length_learned.c - what the auto chooser learned, carried to the next
 * loop over the same models on the same machine (a warm start). Learning
 * costs the most where a generation is short: its first rounds measure
 * batch sizes and acceptances that the last run already knew.
 *
 * The learned state arrives as bytes from a file, so it is checked figure by
 * figure before use; and it is taken at a few rounds' worth, so that a run
 * on another kind of text, or a busier machine, soon outweighs it. What it
 * carries are the costs (the machine's and the models') and a draft model's
 * acceptance and verdicts (the pair's); lookup's belong to the text. */
#include "draft_length.h"

#include <math.h>
#include <string.h>

enum { KEPT_COUNT = 3 };           /* samples a carried mean counts as: as sure as three batches */
static const double KEPT_TESTS  = 8.0;  /* acceptance tests a carried acceptance counts as */
static const double KEPT_ROUNDS = 3.0;  /* whole rounds a carried verdict counts as: one more round decides */

static bool figure(double x) { return isfinite(x) && x >= 0.0; }

static bool mean_fits(double mean, int64_t count) { return figure(mean) && count >= 0; }

/* n tests of which num passed, decayed */
static bool rate_fits(double num, double den) { return figure(num) && figure(den) && num <= den + 1e-9; }

static bool whole_fits(const struct pymoe_whole_rounds * w) {
    return figure(w->n) && figure(w->tokens) && figure(w->seconds) && figure(w->tokens2) && figure(w->seconds2) &&
           figure(w->cross);
}

bool pymoe_draft_length_learned_fits(const struct pymoe_draft_length * d, const struct pymoe_draft_length * l) {
    if (l->k_max != d->k_max || l->target_rewind != d->target_rewind ||
        l->draft_checkpoints != d->draft_checkpoints || l->model_source != d->model_source) {
        return false;
    }
    bool ok = mean_fits(l->draft_mean, l->draft_count) && mean_fits(l->row_mean, l->row_count) &&
              rate_fits(l->acc_num, l->acc_den) && rate_fits(l->lookup_num, l->lookup_den);
    for (int i = 0; i < 2; i++) {
        ok = ok && mean_fits(l->save_mean[i], l->save_count[i]) && mean_fits(l->restore_mean[i], l->restore_count[i]);
    }
    for (int32_t n = 0; n <= PYMOE_SPEC_MAX_BATCH; n++) {
        ok = ok && mean_fits(l->verify_mean[n], l->verify_count[n]);
    }
    for (int i = 0; i < 3; i++) {  /* a round's unnamed time may come out below zero: what no component names */
        ok = ok && isfinite(l->unnamed_mean[i]) && l->unnamed_count[i] >= 0;
    }
    for (int32_t k = 0; k <= PYMOE_SPEC_MAX_DRAFT; k++) {
        ok = ok && whole_fits(&l->whole[k]) && rate_fits(l->depth_num[k], l->depth_den[k]);
    }
    for (int32_t a = 0; a <= PYMOE_LOOKUP_CONTINUES; a++) {
        const struct pymoe_lookup_arm * arm = &l->lookup[a];
        ok = ok && rate_fits(arm->acc_num, arm->acc_den) && whole_fits(&arm->whole) && arm->longest >= 0 &&
             arm->longest <= PYMOE_SPEC_MAX_DRAFT;
    }
    return ok;
}

static void keep_mean(double * mean, int64_t * count, double learned_mean, int64_t learned_count) {
    *mean  = learned_mean;
    *count = learned_count < KEPT_COUNT ? learned_count : KEPT_COUNT;
}

static void keep_rate(double * num, double * den, double learned_num, double learned_den) {
    const double f = learned_den > KEPT_TESTS ? KEPT_TESTS / learned_den : 1.0;
    *num           = f * learned_num;
    *den           = f * learned_den;
}

static void keep_whole(struct pymoe_whole_rounds * w, const struct pymoe_whole_rounds * learned) {
    const double f = learned->n > KEPT_ROUNDS ? KEPT_ROUNDS / learned->n : 1.0;
    w->n           = f * learned->n;
    w->tokens      = f * learned->tokens;
    w->seconds     = f * learned->seconds;
    w->tokens2     = f * learned->tokens2;
    w->seconds2    = f * learned->seconds2;
    w->cross       = f * learned->cross;
}

void pymoe_draft_length_warm_start(struct pymoe_draft_length * d, const struct pymoe_draft_length * l) {
    pymoe_draft_length_init(d, l->k_max);
    d->target_rewind     = l->target_rewind;
    d->draft_checkpoints = l->draft_checkpoints;
    d->model_source      = l->model_source;
    d->warm              = true;
    keep_mean(&d->draft_mean, &d->draft_count, l->draft_mean, l->draft_count);
    keep_mean(&d->row_mean, &d->row_count, l->row_mean, l->row_count);
    for (int i = 0; i < 2; i++) {
        keep_mean(&d->save_mean[i], &d->save_count[i], l->save_mean[i], l->save_count[i]);
        keep_mean(&d->restore_mean[i], &d->restore_count[i], l->restore_mean[i], l->restore_count[i]);
    }
    for (int32_t n = 0; n <= PYMOE_SPEC_MAX_BATCH; n++) {
        keep_mean(&d->verify_mean[n], &d->verify_count[n], l->verify_mean[n], l->verify_count[n]);
    }
    for (int i = 0; i < 3; i++) {
        keep_mean(&d->unnamed_mean[i], &d->unnamed_count[i], l->unnamed_mean[i], l->unnamed_count[i]);
        d->unnamed_seen[i] = -PYMOE_SOURCE_IDLE_ROUNDS - 1;  /* long ago: what a source cost then fades */
    }
    keep_rate(&d->acc_num, &d->acc_den, l->acc_num, l->acc_den);
    for (int32_t k = 0; k <= PYMOE_SPEC_MAX_DRAFT; k++) {
        keep_whole(&d->whole[k], &l->whole[k]);
        keep_rate(&d->depth_num[k], &d->depth_den[k], l->depth_num[k], l->depth_den[k]);
    }
    /* Not lookup's acceptances or verdicts: those belong to the text (a copy
     * task drafts well, the next prompt may copy nothing), not to the models
     * and machine; carried over, one prompt that copied nothing kept lookup
     * from drafting on the next, a copy (measured: 1.01x plain where a cold
     * loop made 2.8x). */
}
