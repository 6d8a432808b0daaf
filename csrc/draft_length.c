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
 * the experts the batch routes to, not linearly: each further token of a
 * batch costs less than the one before (with an expert cache, a batch pays
 * the misses of that union). Sizes not measured are extended with the
 * curve's own power, and exploration measures one size further at a time
 * while a hopeful (concave) extension says a longer draft could pay.
 *
 * An MTP head differs in two ways. Its drafts are the head run on its own
 * output, so acceptance falls with depth: it is learned per depth, and a
 * round of k emits sum_j prod_{i <= j} a_i tokens. And each round the head
 * evaluates again what the last round emitted (from the target's hidden
 * states) and k - 1 drafts, so a round costs (tokens + k - 1) * t_draft.
 *
 * Recurrent state adds a rollback term. A target round drafting more than
 * its snapshots can take back (all of them without snapshots) saves a
 * checkpoint; when more than that is rejected (n_accepted < k - rewind,
 * probability 1 - a^(k - rewind)) it restores it and evaluates the
 * accepted part and the next token again in the next batch, which makes
 * that batch E = sum_{j < k - rewind} a^j (1 - a) (j + 1) tokens longer on
 * average. A draft with checkpoints saves one when it is fed drafts (k >= 2)
 * and restores it unless all k - 1 were accepted. Save and restore times are
 * measured.
 *
 * The model can miss a term (on a GPU run it missed the draft's bookkeeping
 * and catch-up, and drafting lost 12% where it predicted a gain), so it is a
 * prior only. Time a round spends that no component names is learned as a
 * term of its own (for plain and drafting rounds apart), and every k > 0 is
 * gated on whole rounds: emitted tokens against wall time, per k, next to
 * plain rounds measured in the same run, with the noise of both estimated.
 * Drafting that measurably pays runs freely. Drafting that has not (yet)
 * measurably paid runs while what it lost against plain decoding stays
 * within a small share of the time run so far, so a k that loses is
 * dropped for plain decoding and probed again at a bounded cost, and a k
 * that gains is never stopped by the budget. */
#include "draft_length.h"

#include <math.h>
#include <string.h>

enum { WARMUP_ROUNDS = 2, EXPLORE_FIRST = 4, EXPLORE_MAX = 64, CATCHUP_NORMAL = 3, PLAIN_REFRESH = 64 };

static const double ARM_DECAY       = 0.9;   /* whole-round sums remember ~10 rounds of each k */
static const double VERDICT_Z       = 1.5;   /* standard errors a difference must exceed to count */
static const double VERDICT_ROUNDS  = 2.5;   /* decayed rounds an estimate needs (three rounds) */
static const double PROBE_SHARE     = 0.015; /* the share of run time probes may lose */
static const double LOOKUP_SHARE    = 0.005; /* the same for lookup probes: free text offers many short
                                                matches, and a copy under way needs no probe budget */
static const double PROBE_ALLOWANCE = 0.5;   /* plus this many plain tokens' time, while nothing says they lose
                                                (warm starts too: what an unlucky run learned must not keep
                                                every later one from drafting) */
static const double CREDIT_DECAY    = 0.9;   /* per round, of what probes gained */
static const double DRIFT_WEIGHT    = 0.3;
static const double DRIFT_RELAX     = 0.02;  /* per plain round, of the drift's distance from 1 */
static const double KEEP_MARGIN     = 0.03;  /* drafting goes on while rated this close to plain decoding */
static const double UNNAMED_RELAX   = 0.1;   /* per plain round, of an idle source's unnamed time's distance from
                                                plain rounds' */

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
    d->drift   = 1.0;
    d->acc_num = 1.0;  /* prior: a = 0.5, worth two draft tokens */
    d->acc_den = 2.0;
    d->lookup_num = 1.0;
    d->lookup_den = 2.0;
}

/* Seconds per emitted token of the rounds at one k (0: none measured), and
 * its standard error (a ratio estimator over decayed sums; infinite until
 * a few rounds are in). */
static double whole_cost(const struct pymoe_whole_rounds * w, double * se) {
    *se = INFINITY;
    if (w->tokens <= 0.0) {
        return 0.0;
    }
    double c  = w->seconds / w->tokens;
    double e2 = w->seconds2 - 2.0 * c * w->cross + c * c * w->tokens2;  /* sum of (seconds - c * tokens)^2 */
    if (w->n >= VERDICT_ROUNDS) {
        *se = sqrt((e2 > 0.0 ? e2 : 0.0) * w->n / (w->n - 1.0)) / w->tokens;
    }
    return c;
}

static void whole_add(struct pymoe_whole_rounds * w, double tokens, double seconds) {
    w->n        = ARM_DECAY * w->n + 1.0;
    w->tokens   = ARM_DECAY * w->tokens + tokens;
    w->seconds  = ARM_DECAY * w->seconds + seconds;
    w->tokens2  = ARM_DECAY * w->tokens2 + tokens * tokens;
    w->seconds2 = ARM_DECAY * w->seconds2 + seconds * seconds;
    w->cross    = ARM_DECAY * w->cross + tokens * seconds;
}

/* Whole rounds w against plain rounds: +1 measurably faster per token, -1
 * measurably slower, 0 not known (too few rounds or too much noise). */
static int32_t against_plain(const struct pymoe_draft_length * d, const struct pymoe_whole_rounds * w) {
    double se0, sek;
    double c0 = whole_cost(&d->whole[0], &se0);
    double ck = whole_cost(w, &sek);
    if (c0 <= 0.0 || ck <= 0.0 || isinf(se0) || isinf(sek)) {
        return 0;
    }
    double margin = VERDICT_Z * sqrt(se0 * se0 + sek * sek);
    return ck < c0 - margin ? 1 : ck > c0 + margin ? -1 : 0;
}

int32_t pymoe_draft_length_verdict(const struct pymoe_draft_length * d, int32_t k) {
    return k <= 0 || k > PYMOE_SPEC_MAX_DRAFT ? 0 : against_plain(d, &d->whole[k]);
}

double pymoe_draft_length_acceptance(const struct pymoe_draft_length * d) {
    double a = d->acc_num / d->acc_den;
    return a < 0.0 ? 0.0 : a > 0.999 ? 0.999 : a;
}

/* The curve a cost is read from: as measured, or hopeful (what exploration
 * asks: could a longer draft pay, were its batch as cheap as batches that
 * get cheaper per token?). */
/* The source whose drafts cost draft time, and whether it re-evaluates
 * each round what the last one accepted (an MTP head). */
static int32_t model_like(const struct pymoe_draft_length * d) {
    return d->model_source ? d->model_source : PYMOE_DRAFT_MODEL;
}
static bool refeeds(const struct pymoe_draft_length * d) { return d->model_source == PYMOE_DRAFT_MTP; }

/* Where a round's unnamed time is averaged: by what drafted it (0: nothing). */
static int32_t unnamed_slot(int32_t source) { return source == 0 ? 0 : source == PYMOE_DRAFT_LOOKUP ? 2 : 1; }

enum curve { MEASURED, HOPEFUL };

static const double MIN_POWER     = 0.3;  /* the most concave extension believed */
static const double HOPEFUL_POWER = 0.5;  /* what exploration hopes for until the curve is known */
enum { SURE_COUNT = 3 };                  /* batches of a size after which its mean ends the hope */

/* t_verify(n): measured, else interpolated between measured neighbours, else
 * extended past the largest measured size m as v(1) + c (n - 1)^p through
 * the two largest measured sizes, p fitted to v(1) and them. A batch whose
 * further tokens cost less than the first (a MoE's expert union, an expert
 * cache's misses: 1.8, 2.2, 2.7 steps for 2, 3, 4 tokens on the MTP bench
 * model) is extended as such, a linear one as linear; never decreasing.
 * With sizes 1 and 2 only, p is 1 (nothing says a batch gets cheaper). The
 * hopeful curve takes p at most HOPEFUL_POWER until both sizes it extends
 * from were measured a few times. */
static double verify_time(const struct pymoe_draft_length * d, int32_t n, enum curve curve) {
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
    if (lo > 1 && lo2 > 0) {
        const double v1 = d->verify_count[1] > 0 ? d->verify_mean[1] : 0.0;
        const bool   fit = lo2 > 1 && d->verify_count[1] > 0;  /* three sizes: the curve's own power */
        double       p   = 1.0;
        if (fit) {
            const double up_lo = d->verify_mean[lo] - v1, up_lo2 = d->verify_mean[lo2] - v1;
            p = up_lo > 0.0 && up_lo2 > 0.0 ? log(up_lo / up_lo2) / log((lo - 1.0) / (lo2 - 1.0)) : MIN_POWER;
        }
        if (curve == HOPEFUL &&
            (!fit || d->verify_count[lo] < SURE_COUNT || d->verify_count[lo2] < SURE_COUNT)) {
            p = fmin(p, HOPEFUL_POWER);  /* one slow batch must not end the hope (timing noise) */
        }
        p = p < MIN_POWER ? MIN_POWER : p > 1.0 ? 1.0 : p;
        const double c = (d->verify_mean[lo] - d->verify_mean[lo2]) / (pow(lo - 1.0, p) - pow(lo2 - 1.0, p));
        return d->verify_mean[lo] + (c > 0.0 ? c : 0.0) * (pow(n - 1.0, p) - pow(lo - 1.0, p));
    }
    if (lo > 0) {
        return d->verify_mean[lo] * n / lo;  /* one point: assume the worst, linear growth */
    }
    if (hi > 0) {
        return d->verify_mean[hi];
    }
    return 0.0;
}

/* The largest batch size measured. */
static int32_t largest_measured(const struct pymoe_draft_length * d) {
    for (int32_t n = PYMOE_SPEC_MAX_BATCH; n >= 1; n--) {
        if (d->verify_count[n] > 0) {
            return n;
        }
    }
    return 0;
}

static const double DEPTH_PRIOR = 4.0;  /* tests' worth of the depth before's estimate in each depth's */

double pymoe_draft_length_depth_acceptance(const struct pymoe_draft_length * d, int32_t i) {
    /* each depth shrinks to the one before (the first to the pooled estimate):
     * a depth seldom reached keeps what the shallower ones measured */
    double a = pymoe_draft_length_acceptance(d);
    for (int32_t j = 1; j <= i; j++) {
        a = (d->depth_num[j] + DEPTH_PRIOR * a) / (d->depth_den[j] + DEPTH_PRIOR);
    }
    return a < 0.0 ? 0.0 : a > 0.999 ? 0.999 : a;
}

/* s[j] = P(the first j of k drafts are all accepted), j = 0..k, at acceptance
 * a: a^j, or by depth (an MTP head's drafts) each depth's estimate scaled by
 * a / the pooled estimate, so that an optimistic a lifts every depth alike.
 * A draft model's acceptance is taken as one rate: per depth, a single
 * unlucky rejection at a depth seldom reached weighs so much that the
 * chooser stops exploring long drafts (simulated: it lost 10-15% where
 * checkpoints make only long drafts pay). */
static void survival(const struct pymoe_draft_length * d, double a, bool by_depth, int32_t k, double * s) {
    const double pooled = pymoe_draft_length_acceptance(d);
    double       aj     = pooled;
    s[0]                = 1.0;
    for (int32_t j = 1; j <= k; j++) {
        if (by_depth) {  /* pymoe_draft_length_depth_acceptance, one depth at a time */
            aj = (d->depth_num[j] + DEPTH_PRIOR * aj) / (d->depth_den[j] + DEPTH_PRIOR);
        }
        s[j] = s[j - 1] * (by_depth && pooled > 0.0 ? fmin(0.999, a * aj / pooled) : a);
    }
}

/* Expected tokens a round of k drafts emits: the accepted drafts and one more. */
static double tokens_of(const double * s, int32_t k) {
    double n = 0.0;
    for (int32_t j = 0; j <= k; j++) {
        n += s[j];
    }
    return n;
}

/* A draft model evaluates k tokens, and the last one too when all were
 * accepted; an MTP head evaluates again what the last round emitted (about
 * what this one emits) and k - 1 drafts. */
static double draft_time(const struct pymoe_draft_length * d, const double * s, int32_t k) {
    if (k == 0) {
        return 0.0;
    }
    return (refeeds(d) ? k - 1 + tokens_of(s, k) : k + s[k]) * d->draft_mean;
}

/* verify_time at a fractional batch size: between the neighbours */
static double verify_time_at(const struct pymoe_draft_length * d, double n, enum curve curve) {
    int32_t lo = (int32_t) n;
    if (lo >= PYMOE_SPEC_MAX_BATCH) {
        return verify_time(d, PYMOE_SPEC_MAX_BATCH, curve);
    }
    double f = n - lo;
    return f > 0.0 ? (1.0 - f) * verify_time(d, lo, curve) + f * verify_time(d, lo + 1, curve)
                   : verify_time(d, lo, curve);
}

/* Seconds a round of draft length k spends on rollback, and the tokens its
 * restores add to the next batch (both expected values). */
static double rollback_time(const struct pymoe_draft_length * d, const double * s, int32_t k, bool lookup,
                            double * refed) {
    double t = 0.0;
    *refed   = 0.0;
    if (k > d->target_rewind) {
        int32_t beyond = k - d->target_rewind;  /* restores when fewer than this many are accepted */
        for (int32_t j = 0; j < beyond; j++) {
            *refed += (s[j] - s[j + 1]) * (j + 1);  /* exactly j accepted */
        }
        t += d->save_mean[0] + (1.0 - s[beyond]) * d->restore_mean[0];
    }
    if (d->draft_checkpoints && !lookup && k >= 2) {
        t += d->save_mean[1] + (1.0 - s[k - 1]) * d->restore_mean[1];
    }
    return t;
}

/* Tokens per second at draft length k and acceptance a; a lookup draft costs
 * nothing to make and needs no draft-model rollback. */
static double rate_of(const struct pymoe_draft_length * d, int32_t k, double a, bool lookup, enum curve curve) {
    double s[PYMOE_SPEC_MAX_DRAFT + 1];
    survival(d, a, !lookup && refeeds(d), k, s);
    double tokens = tokens_of(s, k);
    double refed  = 0.0;
    double roll   = rollback_time(d, s, k, lookup, &refed);
    double model  = (lookup ? 0.0 : draft_time(d, s, k)) + verify_time_at(d, k + 1 + refed, curve);
    double t      = (k > 0 ? d->drift : 1.0) * model + (k + 1) * d->row_mean + roll +
               d->unnamed_mean[unnamed_slot(k == 0 ? 0 : lookup ? PYMOE_DRAFT_LOOKUP : model_like(d))];
    return t > 0.0 ? tokens / t : 0.0;
}

static double rate_at(const struct pymoe_draft_length * d, int32_t k, double a) {
    return rate_of(d, k, a, false, MEASURED);
}

double pymoe_draft_length_rate(const struct pymoe_draft_length * d, int32_t k) {
    return rate_at(d, k, pymoe_draft_length_acceptance(d));
}

/* An acceptance one standard error above the estimate a from den tests:
 * probes are how it is learned. */
static double optimistic(double a, double den) { return fmin(0.999, a + sqrt(a * (1.0 - a) / den)); }

/* May a probe draft k tokens at (optimistic) acceptance a? While probes have
 * lost less than a small share of the run against plain decoding, plus a
 * little (none where whole rounds measurably lose: verdict < 0). */
static bool probe_allowed(const struct pymoe_draft_length * d, int32_t k, int32_t verdict, double a, bool lookup) {
    double se;
    double c0       = whole_cost(&d->whole[0], &se);
    double budget   = (lookup ? LOOKUP_SHARE : PROBE_SHARE) * d->elapsed +
                    (verdict < 0 ? 0.0 : PROBE_ALLOWANCE * c0);
    double rate     = rate_of(d, k, a, lookup, MEASURED);
    double s[PYMOE_SPEC_MAX_DRAFT + 1];
    survival(d, a, !lookup && refeeds(d), k, s);
    double tokens   = tokens_of(s, k);
    double expected = rate > 0.0 && c0 > 0.0 ? tokens / rate - tokens * c0 : 0.0;  /* by the model */
    return d->probe_loss + (expected > 0.0 ? expected : 0.0) <= budget;
}

/* Tokens per second at draft length k if every draft token were accepted:
 * the most drafting could ever gain. */
static double best_case_rate(const struct pymoe_draft_length * d, int32_t k, enum curve curve) {
    double s[PYMOE_SPEC_MAX_DRAFT + 1];
    survival(d, 1.0, false, k, s);
    double refed = 0.0;
    double roll  = rollback_time(d, s, k, false, &refed);
    double t     = draft_time(d, s, k) + verify_time(d, k + 1, curve) + (k + 1) * d->row_mean + roll +
                   d->unnamed_mean[unnamed_slot(model_like(d))];
    return t > 0.0 ? (k + 1) / t : 0.0;
}

int32_t pymoe_draft_length_choose(struct pymoe_draft_length * d) {
    int32_t kmax = d->k_max;
    int64_t r    = d->rounds;
    if (kmax == 0) {
        return 0;
    }
    /* warm-up: one plain round, then one drafting round (batch times at
     * n = 1 and 2, an acceptance test or two) before the model chooses;
     * each costs little whichever way the run turns out */
    if (r < WARMUP_ROUNDS && !d->warm) {
        static const int32_t order[WARMUP_ROUNDS] = { 0, 1 };
        return order[r];
    }
    int32_t best      = 0, keep = 0;  /* keep: the best k > 0 */
    double  best_rate = -1.0, keep_rate = -1.0, rates[PYMOE_SPEC_MAX_DRAFT + 1];
    for (int32_t k = 0; k <= kmax; k++) {
        rates[k] = pymoe_draft_length_rate(d, k);
        if (rates[k] > best_rate) {
            best_rate = rates[k];
            best      = k;
        }
        if (k > 0 && rates[k] > keep_rate) {
            keep_rate = rates[k];
            keep      = k;
        }
    }
    /* Where drafting gains a few percent, the acceptance estimate's noise
     * alone would flip the model's choice to plain decoding half the time.
     * So a draft length whose whole rounds measurably beat plain ones runs
     * (the fastest of them), and drafting that ran last goes on while the
     * model rates it within a small margin of plain decoding and its whole
     * rounds do not measurably lose. */
    if (best == 0) {
        double  fastest = INFINITY, se;
        int32_t proven  = 0;
        for (int32_t k = 1; k <= kmax; k++) {
            const double cost = whole_cost(&d->whole[k], &se);
            if (pymoe_draft_length_verdict(d, k) > 0 && cost < fastest) {
                fastest = cost;
                proven  = k;
            }
        }
        if (proven > 0) {
            best      = proven;
            best_rate = rates[proven];
        } else if (d->last_best > 0 && keep > 0 && keep_rate >= (1.0 - KEEP_MARGIN) * best_rate &&
                   pymoe_draft_length_verdict(d, keep) >= 0) {
            best      = keep;
            best_rate = keep_rate;
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
    const double hope      = optimistic(pymoe_draft_length_acceptance(d), d->acc_den);  /* what probes hope for */
    int32_t      k         = best;
    const bool   exploring = r >= d->next_explore;
    bool         leap      = false;  /* an exploration more than one batch size past those measured */
    if (exploring) {
        if (best == 0) {
            /* of the draft lengths that could win at all (with a cost per
             * drafting round, a checkpoint or one nobody names, that may be
             * far from k = 1; on a concave curve, only longer drafts), the
             * one the model rates best on the hopeful curve, up to one batch
             * size past those measured, so that a probe measures what the
             * next decision needs; where none of those could win, the
             * nearest longer one that could (where a batch's first extra
             * token is dear, only long drafts pay): a leap, whose cost the
             * extension may guess far too low, so it must be affordable from
             * the run's share of the probe budget even if every draft were
             * rejected */
            const int32_t reach = largest_measured(d);
            double        rate  = -1.0;
            k                   = 0;
            for (int32_t j = 1; j <= kmax && !(k > 0 && j > reach); j++) {
                const double x = rate_of(d, j, hope, false, HOPEFUL);
                if (x > rate && best_case_rate(d, j, HOPEFUL) > best_rate) {
                    rate = x;
                    k    = j;
                }
            }
            leap = k > reach;
        } else if (d->explore_up && best < kmax) {
            for (int32_t up = best + 1; up <= kmax; up++) {  /* the nearest longer draft that could win */
                if (best_case_rate(d, up, HOPEFUL) > best_rate) {
                    k = up;
                    break;
                }
            }
        } else if (best > 0) {
            k = best - 1;
        }
    }
    if (k > 0 && r - d->last_plain > PLAIN_REFRESH) {
        return 0;  /* what drafting is judged against must stay current */
    }
    /* The gate: the model's own choice runs unless its whole rounds
     * measurably lose to plain ones; then it, like every exploration,
     * is a probe, and probes run only within their budget. */
    int32_t verdict = pymoe_draft_length_verdict(d, k);
    d->probing = k > 0 && (k != best || verdict < 0);
    if (d->probing && k != best &&
        !(leap ? probe_allowed(d, k, -1, 0.0, false) : probe_allowed(d, k, verdict, hope, false))) {
        /* an exploration the budget stopped: the model's choice runs, and
         * the exploration is tried again next round, not put off */
        k          = best;
        verdict    = pymoe_draft_length_verdict(d, k);
        d->probing = k > 0 && verdict < 0;
        if (!d->probing || probe_allowed(d, k, verdict, hope, false)) {
            return k;
        }
    }
    if (d->probing && !probe_allowed(d, k, verdict, hope, false)) {
        d->probing = false;
        d->gated += 1;
        return 0;
    }
    if (exploring) {
        d->explore_every = d->explore_every * 2 > EXPLORE_MAX ? EXPLORE_MAX : d->explore_every * 2;
        d->next_explore  = r + d->explore_every;
        d->explore_up    = !d->explore_up;
    }
    return k;
}

/* ---- drafts copied from the context (lookup) ---- */

enum { LONG_MATCH = 4 };            /* a match this long is most likely a copy */
static const double COPY_ACCEPT  = 0.6;  /* a copy's acceptance above which it is drafted long at once */
static const double LONG_PRIOR   = 0.85; /* what a long match's arm is believed worth before it is measured */
static const double LOOKUP_PRIOR = 2.0;  /* tests' worth of what all arms measured, in each one's estimate */

double pymoe_draft_length_lookup_acceptance(const struct pymoe_draft_length * d, int32_t arm) {
    const struct pymoe_lookup_arm * l = &d->lookup[arm];
    double prior = d->lookup_num / d->lookup_den;
    if (arm >= LONG_MATCH && arm != PYMOE_LOOKUP_CONTINUES && prior < LONG_PRIOR) {
        prior = LONG_PRIOR;  /* a long match is most likely a copy, whatever short ones were worth */
    }
    double a = (l->acc_num + LOOKUP_PRIOR * prior) / (l->acc_den + LOOKUP_PRIOR);
    return a < 0.0 ? 0.0 : a > 0.999 ? 0.999 : a;
}


/* The lookup draft length in [1, k_max] with the most tokens per second at
 * acceptance a, if it beats `floor` (0: none does). */
static int32_t best_lookup_k(const struct pymoe_draft_length * d, double a, int32_t k_max, double floor,
                             enum curve curve) {
    int32_t best = 0;
    for (int32_t k = 1; k <= k_max; k++) {
        double x = rate_of(d, k, a, true, curve);
        if (x > floor) {
            floor = x;
            best  = k;
        }
    }
    return best;
}

int32_t pymoe_draft_length_choose_lookup(struct pymoe_draft_length * d, int32_t arm, int32_t k_max) {
    if (arm <= 0 || arm > PYMOE_LOOKUP_CONTINUES || k_max <= 0 || d->verify_count[1] == 0 ||
        d->rounds - d->last_plain > PLAIN_REFRESH) {
        return 0;  /* plain rounds first and now and then: what lookup rounds are judged against */
    }
    const double  a       = pymoe_draft_length_lookup_acceptance(d, arm);
    const double  plain   = rate_of(d, 0, a, true, MEASURED);
    const int32_t verdict = against_plain(d, &d->lookup[arm].whole);
    const double  hi      = optimistic(a, d->lookup[arm].acc_den + LOOKUP_PRIOR);
    const int32_t ramp    = 2 * d->lookup[arm].longest + 1;
    int32_t       best    = best_lookup_k(d, a, k_max, plain, MEASURED);
    /* Past twice what the arm has had accepted, a draft must be affordable
     * even if every one were rejected (what earlier drafts won may be
     * staked): an estimate from two rounds rated a 16-token jump a gain on
     * a 17-token copy on a quantized target, and it lost 40%. */
    while (best > ramp && !probe_allowed(d, best, verdict, 0.0, true)) {
        best--;
    }
    /* Explore past the estimate's choice where the estimate one standard
     * error better says a longer draft pays on the hopeful curve, and only
     * while what the estimate itself expects it to lose fits the probe
     * budget. A copy is what a long match, or drafts all accepted last
     * round, most likely are: while such rounds are mostly right, one may
     * draft as far as pays at once; any other at most
     * twice as far as its arm has been accepted (a copy under way is
     * followed in a few doublings); the longest draft toward that which the
     * probe budget allows runs (see below). With only single-token batches
     * measured, verify cost is extrapolated as linear (nothing could pay),
     * so a batch of two is measured first. */
    const bool    copy  = (arm == PYMOE_LOOKUP_CONTINUES || arm >= LONG_MATCH) && a >= COPY_ACCEPT;
    const int32_t reach = copy ? k_max : ramp;
    int32_t       up    = d->verify_count[2] == 0 && !copy
                              ? 1
                              : best_lookup_k(d, hi, k_max < reach ? k_max : reach, plain, HOPEFUL);
    /* the longest draft toward it that the budget allows; past the ramp,
     * even if every draft were rejected (as above) */
    while (up > best &&
           !(probe_allowed(d, up, verdict, a, true) && (up <= ramp || probe_allowed(d, up, verdict, 0.0, true)))) {
        up--;
    }
    if (up > best) {
        d->probing = true;
        return up;
    }
    /* the estimate's own choice runs unless this arm's whole rounds measurably lose */
    d->probing = best > 0 && verdict < 0;
    if (d->probing && !probe_allowed(d, best, verdict, hi, true)) {
        d->probing = false;
        d->gated += 1;
        return 0;
    }
    return best;
}

/* The gate's evidence: the whole round, and for a probe what it lost
 * against plain decoding (gains offset the luck of nearby probes, and fade). */
static void judge_round(struct pymoe_draft_length * d, const struct pymoe_round_cost * c, double round) {
    const double tokens = c->n_accepted + 1;
    double       se;
    double       c0 = whole_cost(&d->whole[0], &se);
    if (d->probe_loss < 0.0) {
        d->probe_loss *= CREDIT_DECAY;
    }
    if (d->probing && c->n_draft > 0 && c0 > 0.0) {
        d->probe_loss += round - tokens * c0;
    }
    d->probing = false;
    d->elapsed += round;
    whole_add(c->source == PYMOE_DRAFT_LOOKUP && c->n_draft > 0 ? &d->lookup[c->lookup_arm].whole
                                                                : &d->whole[c->n_draft],
              tokens, round);
    if (c->n_draft == 0) {
        d->last_plain = d->rounds;
    }
}

void pymoe_draft_length_update(struct pymoe_draft_length * d, const struct pymoe_round_cost * c) {
    const double named = c->draft_seconds + c->verify_seconds + c->other_seconds + c->target_save_seconds +
                         c->draft_save_seconds + c->target_restore_seconds + c->draft_restore_seconds;
    const double round = c->round_seconds > named ? c->round_seconds : named;
    judge_round(d, c, round);
    d->rounds += 1;
    /* each accepted token passed a test; a rejection is one more test */
    const int32_t tests = c->n_accepted + (c->n_accepted < c->n_draft ? 1 : 0);
    if (c->n_draft > 0 && c->source == PYMOE_DRAFT_LOOKUP) {
        struct pymoe_lookup_arm * arm = &d->lookup[c->lookup_arm];
        arm->longest  = c->n_accepted > arm->longest ? c->n_accepted : arm->longest;
        arm->acc_num  = 0.95 * arm->acc_num + c->n_accepted;
        arm->acc_den  = 0.95 * arm->acc_den + tests;
        d->lookup_num = 0.95 * d->lookup_num + c->n_accepted;
        d->lookup_den = 0.95 * d->lookup_den + tests;
    } else if (c->n_draft > 0) {
        d->acc_num = 0.95 * d->acc_num + c->n_accepted;
        d->acc_den = 0.95 * d->acc_den + tests;
        for (int32_t i = 1; i <= c->n_draft && i <= c->n_accepted + 1; i++) {
            d->depth_num[i] = 0.95 * d->depth_num[i] + (i <= c->n_accepted);
            d->depth_den[i] = 0.95 * d->depth_den[i] + 1.0;
        }
    }
    if (c->extra_tests > 0) {  /* tests of a first draft: depth 1's too */
        d->acc_num += c->extra_passed;
        d->acc_den += c->extra_tests;
        d->depth_num[1] += c->extra_passed;
        d->depth_den[1] += c->extra_tests;
    }
    /* a long catch-up is a prefill (an MTP head catches up on every accepted token, every round) */
    const int32_t catchup_normal = refeeds(d) ? PYMOE_SPEC_MAX_DRAFT + 1 : CATCHUP_NORMAL;
    if (c->draft_tokens > 0 && c->catchup_tokens <= catchup_normal) {
        average_in(&d->draft_mean, &d->draft_count, c->draft_seconds / c->draft_tokens);
    }
    int32_t n = c->batch_tokens > 0 ? c->batch_tokens : c->n_draft + 1;
    if (c->n_draft > 0 && n <= PYMOE_SPEC_MAX_BATCH && d->verify_count[n] > 0) {
        /* the averages below follow a change slowly: a fast ratio of what
         * drafting rounds took to what the averages say covers the lag */
        double predicted = c->draft_tokens * d->draft_mean + verify_time(d, n, MEASURED);
        if (predicted > 0.0) {
            d->drift += DRIFT_WEIGHT * ((c->draft_seconds + c->verify_seconds) / predicted - d->drift);
        }
    } else if (c->n_draft == 0) {
        /* no drafting round says otherwise: an unlucky ratio that made
         * drafting look dear must not stop drafting for good, so it fades */
        d->drift += DRIFT_RELAX * (1.0 - d->drift);
    }
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
    const int32_t slot = unnamed_slot(c->n_draft > 0 ? c->source : 0);
    average_in(&d->unnamed_mean[slot], &d->unnamed_count[slot], round - named);
    d->unnamed_seen[slot] = d->rounds;
    /* A source's unnamed time is measured only in its own rounds: one slow
     * round (a page fault, another process), or a warm start from a busier
     * day, would keep a source that then looks too dear from ever drafting
     * again. So once a source has not drafted for a while, an estimate above
     * what plain rounds measure now fades toward it, and the source is tried
     * again; a cost that is real is measured again by that round. */
    for (int32_t i = 1; c->n_draft == 0 && i < 3; i++) {
        if (d->unnamed_count[i] > 0 && d->unnamed_mean[i] > d->unnamed_mean[0] &&
            d->rounds - d->unnamed_seen[i] > PYMOE_SOURCE_IDLE_ROUNDS) {
            d->unnamed_mean[i] += UNNAMED_RELAX * (d->unnamed_mean[0] - d->unnamed_mean[i]);
        }
    }
}
