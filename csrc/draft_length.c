/* draft_length.c - choose the draft length k from measured costs.
 *
 * With a per-token acceptance rate a, a round that drafts k tokens emits
 * (1 - a^(k+1)) / (1 - a) tokens on average and costs
 *     (k + a^k) * t_draft + t_verify(k + 1) + (k + 1) * t_row
 * (t_draft: per token the draft evaluates; it evaluates k of them, plus the
 * last draft token when all k were accepted, which it never saw; t_row:
 * per-row work outside the models: transforms, verification). The
 * chooser keeps moving averages of each term and picks the k in [0, k_max]
 * with the most tokens per second; k = 0 is plain decoding. t_verify is
 * measured per batch size because on MoE targets it grows with the union of
 * the experts the batch routes to, not linearly.
 *
 * Recurrent state adds a rollback term. A target round drafting more than
 * its snapshots can take back (all of them without snapshots) saves a
 * checkpoint; when more than that is rejected (n_accepted < k - rewind,
 * probability 1 - a^(k - rewind)) it restores it and evaluates the
 * accepted part and the next token again in the next batch, which makes
 * that batch E = sum_{j < k - rewind} a^j (1 - a) (j + 1) tokens longer on
 * average. A draft with checkpoints saves one when it is fed drafts (k >= 2)
 * and restores it unless all k - 1 were accepted. Save and restore times are
 * measured. */
#include "draft_length.h"

#include <math.h>
#include <string.h>

enum { WARMUP_ROUNDS = 4, EXPLORE_FIRST = 16, EXPLORE_MAX = 256, CATCHUP_NORMAL = 3 };

/* Running mean for the first samples, then an exponential average that
 * follows slow drifts (thermal, other processes) without chasing noise. */
static void average_in(double * mean, int64_t * count, double x) {
    *count += 1;
    double w = 1.0 / (double) *count;
    if (w < 0.1) {
        w = 0.1;
    }
    *mean += w * (x - *mean);
}

void pymoe_draft_length_init(struct pymoe_draft_length * d, int32_t k_max) {
    memset(d, 0, sizeof(*d));
    d->k_max     = k_max;
    d->last_best = -1;
    d->target_rewind = PYMOE_SPEC_MAX_DRAFT;  /* a KV cache, until told otherwise */
    d->acc_num = 1.0;  /* prior: a = 0.5, worth two draft tokens */
    d->acc_den = 2.0;
}

double pymoe_draft_length_acceptance(const struct pymoe_draft_length * d) {
    double a = d->acc_num / d->acc_den;
    return a < 0.0 ? 0.0 : a > 0.999 ? 0.999 : a;
}

/* t_verify(n): measured, else interpolated between measured neighbours, else
 * extended from the last two measured sizes (never decreasing). */
static double verify_time(const struct pymoe_draft_length * d, int32_t n) {
    if (d->verify_count[n] > 0) {
        return d->verify_mean[n];
    }
    int32_t lo = -1, hi = -1, lo2 = -1;
    for (int32_t i = n - 1; i >= 1; i--) {
        if (d->verify_count[i] > 0) {
            if (lo < 0) {
                lo = i;
            } else {
                lo2 = i;
                break;
            }
        }
    }
    for (int32_t i = n + 1; i <= PYMOE_SPEC_MAX_BATCH; i++) {
        if (d->verify_count[i] > 0) {
            hi = i;
            break;
        }
    }
    if (lo > 0 && hi > 0) {
        double f = (double) (n - lo) / (double) (hi - lo);
        return d->verify_mean[lo] + f * (d->verify_mean[hi] - d->verify_mean[lo]);
    }
    if (lo > 0 && lo2 > 0) {
        double slope = (d->verify_mean[lo] - d->verify_mean[lo2]) / (double) (lo - lo2);
        return d->verify_mean[lo] + (slope > 0.0 ? slope : 0.0) * (n - lo);
    }
    if (lo > 0) {
        return d->verify_mean[lo] * n / lo;  /* one point: assume the worst, linear growth */
    }
    if (hi > 0) {
        return d->verify_mean[hi];
    }
    return 0.0;
}

static double draft_time(const struct pymoe_draft_length * d, double a, int32_t k) {
    return k > 0 ? (k + pow(a, k)) * d->draft_mean : 0.0;
}

/* verify_time at a fractional batch size: between the neighbours */
static double verify_time_at(const struct pymoe_draft_length * d, double n) {
    int32_t lo = (int32_t) n;
    if (lo >= PYMOE_SPEC_MAX_BATCH) {
        return verify_time(d, PYMOE_SPEC_MAX_BATCH);
    }
    double f = n - lo;
    return f > 0.0 ? (1.0 - f) * verify_time(d, lo) + f * verify_time(d, lo + 1) : verify_time(d, lo);
}

/* Seconds a round of draft length k spends on rollback, and the tokens its
 * restores add to the next batch (both expected values). */
static double rollback_time(const struct pymoe_draft_length * d, double a, int32_t k, double * refed) {
    double t = 0.0;
    *refed   = 0.0;
    if (k > d->target_rewind) {
        int32_t beyond = k - d->target_rewind;  /* restores when fewer than this many are accepted */
        for (int32_t j = 0; j < beyond; j++) {
            *refed += pow(a, j) * (1.0 - a) * (j + 1);
        }
        t += d->save_mean[0] + (1.0 - pow(a, beyond)) * d->restore_mean[0];
    }
    if (d->draft_checkpoints && k >= 2) {
        t += d->save_mean[1] + (1.0 - pow(a, k - 1)) * d->restore_mean[1];
    }
    return t;
}

double pymoe_draft_length_rate(const struct pymoe_draft_length * d, int32_t k) {
    double a      = pymoe_draft_length_acceptance(d);
    double tokens = (1.0 - pow(a, k + 1)) / (1.0 - a);
    double refed  = 0.0;
    double roll   = rollback_time(d, a, k, &refed);
    double t      = draft_time(d, a, k) + verify_time_at(d, k + 1 + refed) + (k + 1) * d->row_mean + roll;
    return t > 0.0 ? tokens / t : 0.0;
}

/* Tokens per second at draft length k if every draft token were accepted:
 * the most drafting could ever gain. */
static double best_case_rate(const struct pymoe_draft_length * d, int32_t k) {
    double refed = 0.0;
    double roll  = rollback_time(d, 1.0, k, &refed);
    double t     = draft_time(d, 1.0, k) + verify_time(d, k + 1) + (k + 1) * d->row_mean + roll;
    return t > 0.0 ? (k + 1) / t : 0.0;
}

int32_t pymoe_draft_length_choose(struct pymoe_draft_length * d) {
    int32_t kmax = d->k_max;
    int64_t r    = d->rounds;
    if (kmax == 0) {
        return 0;
    }
    /* warm-up: a cold round (its times are not used: first decodes
     * allocate), plain decoding, then k = 3 and k = 1: batch times at n = 1,
     * 2 and 4, and a few acceptance tests, before any choice is made */
    if (r < WARMUP_ROUNDS) {
        static const int32_t order[WARMUP_ROUNDS] = { 1, 0, 3, 1 };
        return order[r] < kmax ? order[r] : kmax;
    }
    int32_t best      = 0;
    double  best_rate = -1.0;
    for (int32_t k = 0; k <= kmax; k++) {
        double rate = pymoe_draft_length_rate(d, k);
        if (rate > best_rate) {
            best_rate = rate;
            best      = k;
        }
    }
    if (best != d->last_best) {  /* the situation changed: look around again soon */
        d->last_best      = best;
        d->explore_every  = EXPLORE_FIRST;
        d->next_explore   = r + EXPLORE_FIRST;
    }
    /* Exploration keeps the neighbours' costs and the acceptance current. It
     * is skipped when the neighbour could not win even at 100% acceptance
     * (on CPUs with quantized weights a batch of n costs about n single
     * steps, so drafting never pays), and it gets rarer while the best k
     * stays the same, because a k > 0 round after plain rounds must first
     * catch the draft up on everything it skipped. */
    if (r >= d->next_explore) {
        d->explore_every = d->explore_every * 2 > EXPLORE_MAX ? EXPLORE_MAX : d->explore_every * 2;
        d->next_explore  = r + d->explore_every;
        d->explore_up    = !d->explore_up;
        if ((d->explore_up || best == 0) && best < kmax) {
            /* up: the nearest longer draft that could win; with a fixed cost
             * per drafting round (a checkpoint) that may be several steps away */
            for (int32_t k = best + 1; k <= kmax; k++) {
                if (best_case_rate(d, k) > best_rate) {
                    return k;
                }
            }
        } else if (best > 0) {
            return best - 1;
        }
    }
    return best;
}

void pymoe_draft_length_update(struct pymoe_draft_length * d, const struct pymoe_round_cost * c) {
    d->rounds += 1;
    if (c->n_draft > 0) {
        /* each accepted token passed a test; a rejection is one more test */
        int32_t tests = c->n_accepted + (c->n_accepted < c->n_draft ? 1 : 0);
        d->acc_num    = 0.95 * d->acc_num + c->n_accepted;
        d->acc_den    = 0.95 * d->acc_den + tests;
    }
    if (c->extra_tests > 0) {
        d->acc_num += c->extra_passed;
        d->acc_den += c->extra_tests;
    }
    if (d->rounds == 1) {
        return;  /* the cold round: its acceptance counts, its times do not */
    }
    if (c->draft_tokens > 0 && c->catchup_tokens <= CATCHUP_NORMAL) {  /* a long catch-up is a prefill */
        average_in(&d->draft_mean, &d->draft_count, c->draft_seconds / c->draft_tokens);
    }
    int32_t n = c->batch_tokens > 0 ? c->batch_tokens : c->n_draft + 1;
    if (n <= PYMOE_SPEC_MAX_BATCH) {
        average_in(&d->verify_mean[n], &d->verify_count[n], c->verify_seconds);
    }
    const double saves[2] = { c->target_save_seconds, c->draft_save_seconds };
    const double restores[2] = { c->target_restore_seconds, c->draft_restore_seconds };
    for (int i = 0; i < 2; i++) {
        if (saves[i] > 0.0) {
            average_in(&d->save_mean[i], &d->save_count[i], saves[i]);
        }
        if (restores[i] > 0.0) {
            average_in(&d->restore_mean[i], &d->restore_count[i], restores[i]);
        }
    }
    average_in(&d->row_mean, &d->row_count, c->other_seconds / (c->n_draft + 1));
}
