/* draft_length_sim.c - drive the auto draft-length chooser with simulated
 * costs and acceptances, and print what it achieved next to the best fixed k
 * run through the same simulation (same seeds, same rounds).
 *
 *   draft_length_sim [OPTIONS] T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED
 *
 * Verify time of a batch of n is T_VERIFY1 + SLOPE * g(n), g(1) = 0 and
 * g(2) = 1 (SLOPE: what a second token adds), g(n) = n - 1 unless --curve
 * says otherwise; each draft token is accepted with probability ACCEPTANCE
 * until the first rejection; T_DRAFT is per token the draft evaluates.
 * Options add what the chooser's cost model does not know:
 *   --curve concave P  g(n) = (n - 1)^P: each further token dearer than none,
 *                   cheaper than the one before (the MTP bench model's CPU
 *                   batches: 1.8, 2.2, 2.7 steps for 2, 3, 4 tokens)
 *   --curve experts E K  a MoE's batch reads the union of its tokens'
 *                   experts (K of E each, routed independently): g(n) =
 *                   (U(n) - U(1)) / (U(2) - U(1)), U(n) = E (1 - (1 - K/E)^n).
 *                   With an expert cache a batch pays only the union's
 *                   misses: the hit rate scales SLOPE, not the shape
 *   --copies A_COPY A_FREE LEN  lookup-like acceptance: runs of LEN tokens on
 *                   average at A_COPY (a copy under way) alternate with runs
 *                   at A_FREE (nothing to copy); ACCEPTANCE is unused
 *   --checkpoint SAVE RESTORE  the target keeps recurrent state without
 *                   snapshots, like the loop: every drafting round saves a
 *                   checkpoint, a partial acceptance restores it and puts the
 *                   accepted tokens and the next one into the next batch
 *   --hidden F      every drafting round costs F * T_VERIFY1 more, in no
 *                   component the loop reports (only in the round's wall time)
 *   --jitter F      each round's times are scaled by a uniform factor in
 *                   [1 - F, 1 + F] (default 0.05)
 *   --bursty        acceptance switches between ACCEPTANCE and ACCEPTANCE / 4,
 *                   in bursts of 20 rounds on average
 *   --shift F       from the middle round on, SLOPE and T_DRAFT are F times
 *                   larger (another process competes for the machine)
 *   --depth-decay F the i-th draft token of a round (i = 1, 2, ...) is accepted
 *                   with probability ACCEPTANCE * F^(i-1): a draft run on its
 *                   own output (an MTP head) gets worse with depth
 *   --refeeds       MTP-like draft costs: a drafting round evaluates every
 *                   token emitted since the last drafting round, and k - 1
 *                   drafts; a backlog longer than a round's is evaluated as a
 *                   batch (each further token a tenth of one alone), and at
 *                   64 tokens in a plain round too, as the loop does. Like the
 *                   loop's head, such a catch-up tests a first draft on up to
 *                   8 of the tokens plain rounds emitted (free tests)
 *   --warm N        auto starts from what it learned in an earlier run of N
 *                   rounds over the same costs (other draws): a warm start
 *   --repeats N     N runs with seeds SEED, SEED + 1, ...; totals over all
 * Prints "achieved <tokens/s> best <tokens/s> best_k <k>". */
#include "draft_length.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct regime {
    double td, t1, slope, a, save, restore, hidden, jitter, shift, depth_decay;
    bool   checkpoints, bursty, refeeds;
    double power;             /* --curve concave: the exponent (0: linear) */
    double experts, used;     /* --curve experts: E and K (0: not this curve) */
    double a_copy, a_free, copy_run;  /* --copies (copy_run 0: not on) */
};

/* g(n) of the verify curve: what a batch of n adds to one token, in units of
 * what a second token adds. */
static double batch_growth(const struct regime * g, int n) {
    if (g->experts > 0.0) {
        const double keep = 1.0 - g->used / g->experts;
        return (keep - pow(keep, n)) / (keep - keep * keep);
    }
    return g->power > 0.0 ? pow(n - 1, g->power) : n - 1;
}

enum { MTP_BACKLOG = 64, MTP_TESTS = 8 };  /* the loop's own limits (speculative.c, mtp.c) */
static const double PREFILL_SHARE = 0.1;

struct totals {
    double tokens, seconds;
};

/* One run of `rounds` rounds: auto when k_fixed < 0. The random streams
 * (acceptance, timing, bursts) depend on the seed and the round only, not on
 * k, so that every k meets the same luck. */
static void simulate(const struct regime * g, int k_fixed, int kmax, int rounds, uint64_t seed, struct totals * out,
                     const struct pymoe_draft_length * learned, struct pymoe_draft_length * final) {
    uint64_t acc_rng = 0, time_rng = 0, burst_rng = 0, test_rng = 0;
    pymoe_rng_seed(&acc_rng, seed);
    pymoe_rng_seed(&time_rng, seed * 7919 + 1);
    pymoe_rng_seed(&burst_rng, seed * 104729 + 2);
    pymoe_rng_seed(&test_rng, seed * 15485863 + 3);
    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, kmax);
    if (g->checkpoints) {
        d.target_rewind = 0;
    }
    d.model_source    = g->refeeds ? PYMOE_DRAFT_MTP : PYMOE_DRAFT_MODEL;
    if (learned) {
        if (!pymoe_draft_length_learned_fits(&d, learned)) {
            fprintf(stderr, "the learned state does not fit\n");
            exit(1);
        }
        pymoe_draft_length_warm_start(&d, learned);
    }
    /* plain_tokens: the head's entries since the last drafting round's newest (that one included) */
    int  all_accepted = 0, refed = 0, backlog = 1, plain_tokens = 1;
    bool low          = false;
    int  run_left     = 0;  /* --copies: tokens left in this run */
    for (int r = 0; r < rounds; r++) {
        const bool   late  = g->shift > 0.0 && r >= rounds / 2;
        const double td    = late ? g->td * g->shift : g->td;
        const double slope = late ? g->slope * g->shift : g->slope;
        if (g->bursty && pymoe_rng_uniform(&burst_rng) < 1.0 / 20.0) {
            low = !low;
        }
        double a = low ? g->a / 4.0 : g->a;
        if (g->copy_run > 0.0) {
            if (run_left <= 0) {  /* a new run, copying or not; its length 1..2 LEN */
                low      = !low;
                run_left = 1 + (int) (2.0 * g->copy_run * pymoe_rng_uniform(&burst_rng));
            }
            a = low ? g->a_free : g->a_copy;
        }
        int          k = k_fixed >= 0 ? k_fixed : pymoe_draft_length_choose(&d);
        if (k_fixed < 0 && getenv("SIM_TRACE")) {
            fprintf(stderr, "%d:%d(a%.2f v%d L%.3f) ", r, k, pymoe_draft_length_acceptance(&d),
                    pymoe_draft_length_verdict(&d, k), d.probe_loss);
        }
        int          n_acc = 0;
        for (int i = 0; i < kmax; i++) {  /* kmax draws a round whatever k is */
            const bool pass = pymoe_rng_uniform(&acc_rng) < a * pow(g->depth_decay, i);
            if (i < k && n_acc == i && pass) {
                n_acc++;
            }
        }
        const double noise     = 1.0 - g->jitter + 2.0 * g->jitter * pymoe_rng_uniform(&time_rng);
        const int    evaluated = k == 0 ? 0 : g->refeeds ? backlog + k - 1 : k + all_accepted;
        /* the head's work in tokens alone: a long backlog is one batch */
        const double head_work = k == 0 || !g->refeeds || backlog <= kmax + 1
                                     ? evaluated
                                     : kmax + 1 + PREFILL_SHARE * (backlog - kmax - 1) + k - 1;
        const int    batch     = refed + 1 + k;
        const bool   restore   = g->checkpoints && n_acc < k;
        struct pymoe_round_cost rc = {
            .n_draft                = k,
            .source                 = k == 0 ? 0 : d.model_source,
            .n_accepted             = n_acc,
            .draft_tokens           = evaluated,
            .catchup_tokens         = k == 0 ? 0 : g->refeeds ? backlog : 1 + all_accepted,
            .batch_tokens           = batch,
            .draft_seconds          = head_work * td * noise,
            .verify_seconds         = (g->t1 + slope * batch_growth(g, batch)) * noise,
            .target_save_seconds    = g->checkpoints && k > 0 ? g->save * noise : 0.0,
            .target_restore_seconds = restore ? g->restore * noise : 0.0,
        };
        all_accepted = k > 0 && n_acc == k;
        /* a catch-up's tests: those entries whose next token (a plain round's) is known */
        int tested   = g->refeeds && k > 0 ? plain_tokens - 1 : 0;
        plain_tokens = k > 0 ? 1 : plain_tokens + 1;
        backlog      = (k > 0 ? 0 : backlog) + n_acc + 1;
        if (g->refeeds && backlog >= MTP_BACKLOG) {  /* caught up in a plain round */
            rc.draft_seconds += (kmax + 1 + PREFILL_SHARE * (backlog - kmax - 1)) * td * noise;
            tested       = plain_tokens - 1;
            plain_tokens = 1;  /* the newest: its next token is not known yet */
            backlog      = 0;
        }
        for (int i = 0; i < tested && i < MTP_TESTS; i++) {
            rc.extra_tests += 1;
            rc.extra_passed += pymoe_rng_uniform(&test_rng) < a;
        }
        refed        = restore ? refed + n_acc + 1 : 0;
        if (refed > kmax) { /* the loop evaluates a long backlog at once */
            rc.target_restore_seconds += (g->t1 + slope * batch_growth(g, refed)) * noise;
            refed = 0;
        }
        rc.round_seconds = rc.draft_seconds + rc.verify_seconds + rc.target_save_seconds + rc.target_restore_seconds +
                           (k > 0 ? g->hidden * g->t1 * noise : 0.0);
        pymoe_draft_length_update(&d, &rc);
        out->tokens += n_acc + 1;
        run_left -= n_acc + 1;
        out->seconds += rc.round_seconds;
    }
    if (final) {
        *final = d;
    }
}

static int usage(const char * argv0) {
    fprintf(stderr,
            "usage: %s [--checkpoint SAVE RESTORE] [--hidden F] [--jitter F] [--bursty] [--shift F]\n"
            "          [--depth-decay F] [--refeeds] [--warm N] [--repeats N] [--curve concave P | --curve experts E K]\n"
            "          [--copies A_COPY A_FREE LEN]\n"
            "          T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED\n",
            argv0);
    return 2;
}

int main(int argc, char ** argv) {
    struct regime g       = { .jitter = 0.05, .depth_decay = 1.0 };
    int           repeats = 1, warm_rounds = 0, i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char * o    = argv[i];
        const bool   more = i + 1 < argc;
        if (strcmp(o, "--checkpoint") == 0 && i + 2 < argc) {
            g.checkpoints = true;
            g.save        = atof(argv[++i]);
            g.restore     = atof(argv[++i]);
        } else if (strcmp(o, "--hidden") == 0 && more) {
            g.hidden = atof(argv[++i]);
        } else if (strcmp(o, "--jitter") == 0 && more) {
            g.jitter = atof(argv[++i]);
        } else if (strcmp(o, "--shift") == 0 && more) {
            g.shift = atof(argv[++i]);
        } else if (strcmp(o, "--warm") == 0 && more) {
            warm_rounds = atoi(argv[++i]);
        } else if (strcmp(o, "--repeats") == 0 && more) {
            repeats = atoi(argv[++i]);
        } else if (strcmp(o, "--bursty") == 0) {
            g.bursty = true;
        } else if (strcmp(o, "--depth-decay") == 0 && more) {
            g.depth_decay = atof(argv[++i]);
        } else if (strcmp(o, "--curve") == 0 && more && strcmp(argv[i + 1], "concave") == 0 && i + 2 < argc) {
            g.power = atof(argv[i + 2]);
            i += 2;
        } else if (strcmp(o, "--curve") == 0 && more && strcmp(argv[i + 1], "experts") == 0 && i + 3 < argc) {
            g.experts = atof(argv[i + 2]);
            g.used    = atof(argv[i + 3]);
            i += 3;
            if (!(g.used >= 1.0 && g.used < g.experts)) {
                return usage(argv[0]);
            }
        } else if (strcmp(o, "--copies") == 0 && i + 3 < argc) {
            g.a_copy   = atof(argv[++i]);
            g.a_free   = atof(argv[++i]);
            g.copy_run = atof(argv[++i]);
        } else if (strcmp(o, "--refeeds") == 0) {
            g.refeeds = true;
        } else {
            return usage(argv[0]);
        }
    }
    if (argc - i != 7 || repeats < 1) {
        return usage(argv[0]);
    }
    g.td = atof(argv[i]);
    g.t1 = atof(argv[i + 1]);
    g.slope = atof(argv[i + 2]);
    g.a = atof(argv[i + 3]);
    const int      kmax = atoi(argv[i + 4]), rounds = atoi(argv[i + 5]);
    const uint64_t seed = (uint64_t) atoll(argv[i + 6]);
    if (kmax < 0 || kmax > PYMOE_SPEC_MAX_DRAFT || rounds < 1) {
        return usage(argv[0]);
    }

    struct totals achieved = { 0 };
    for (int rep = 0; rep < repeats; rep++) {
        struct pymoe_draft_length learned;
        if (warm_rounds > 0) {  /* an earlier run on other text (its own seed), then this one from what it learned */
            struct totals earlier = { 0 };
            simulate(&g, -1, kmax, warm_rounds, seed + rep + 1000003, &earlier, NULL, &learned);
        }
        simulate(&g, -1, kmax, rounds, seed + rep, &achieved, warm_rounds > 0 ? &learned : NULL, NULL);
    }
    int    best_k = 0;
    double best   = 0.0;
    for (int k = 0; k <= kmax; k++) {
        struct totals t = { 0 };
        for (int rep = 0; rep < repeats; rep++) {
            simulate(&g, k, kmax, rounds, seed + rep, &t, NULL, NULL);
        }
        if (t.tokens / t.seconds > best) {
            best   = t.tokens / t.seconds;
            best_k = k;
        }
    }
    printf("achieved %.6f best %.6f best_k %d\n", achieved.tokens / achieved.seconds, best, best_k);
    return 0;
}
