/* draft_length_sim.c - drive the auto draft-length chooser with simulated
 * costs and acceptances, and print what it achieved next to the best fixed k
 * run through the same simulation (same seeds, same rounds).
 *
 *   draft_length_sim [OPTIONS] T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED
 *
 * Verify time of a batch of n is T_VERIFY1 + SLOPE * (n - 1); each draft token
 * is accepted with probability ACCEPTANCE until the first rejection; T_DRAFT is
 * per token the draft evaluates. Options add what the chooser's cost model
 * does not know:
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
 *                   token emitted since the last drafting round, and k - 1 drafts
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
};

struct totals {
    double tokens, seconds;
};

/* One run of `rounds` rounds: auto when k_fixed < 0. The random streams
 * (acceptance, timing, bursts) depend on the seed and the round only, not on
 * k, so that every k meets the same luck. */
static void simulate(const struct regime * g, int k_fixed, int kmax, int rounds, uint64_t seed, struct totals * out) {
    uint64_t acc_rng = 0, time_rng = 0, burst_rng = 0;
    pymoe_rng_seed(&acc_rng, seed);
    pymoe_rng_seed(&time_rng, seed * 7919 + 1);
    pymoe_rng_seed(&burst_rng, seed * 104729 + 2);
    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, kmax);
    if (g->checkpoints) {
        d.target_rewind = 0;
    }
    d.draft_refeeds   = g->refeeds;
    int  all_accepted = 0, refed = 0, backlog = 1;
    bool low          = false;
    for (int r = 0; r < rounds; r++) {
        const bool   late  = g->shift > 0.0 && r >= rounds / 2;
        const double td    = late ? g->td * g->shift : g->td;
        const double slope = late ? g->slope * g->shift : g->slope;
        if (g->bursty && pymoe_rng_uniform(&burst_rng) < 1.0 / 20.0) {
            low = !low;
        }
        const double a = low ? g->a / 4.0 : g->a;
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
        const int    batch     = refed + 1 + k;
        const bool   restore   = g->checkpoints && n_acc < k;
        struct pymoe_round_cost rc = {
            .n_draft                = k,
            .n_accepted             = n_acc,
            .draft_tokens           = evaluated,
            .catchup_tokens         = k == 0 ? 0 : g->refeeds ? backlog : 1 + all_accepted,
            .batch_tokens           = batch,
            .draft_seconds          = evaluated * td * noise,
            .verify_seconds         = (g->t1 + slope * (batch - 1)) * noise,
            .target_save_seconds    = g->checkpoints && k > 0 ? g->save * noise : 0.0,
            .target_restore_seconds = restore ? g->restore * noise : 0.0,
        };
        all_accepted = k > 0 && n_acc == k;
        backlog      = (k > 0 ? 0 : backlog) + n_acc + 1;
        refed        = restore ? refed + n_acc + 1 : 0;
        if (refed > kmax) { /* the loop evaluates a long backlog at once */
            rc.target_restore_seconds += (g->t1 + slope * (refed - 1)) * noise;
            refed = 0;
        }
        rc.round_seconds = rc.draft_seconds + rc.verify_seconds + rc.target_save_seconds + rc.target_restore_seconds +
                           (k > 0 ? g->hidden * g->t1 * noise : 0.0);
        pymoe_draft_length_update(&d, &rc);
        out->tokens += n_acc + 1;
        out->seconds += rc.round_seconds;
    }
}

static int usage(const char * argv0) {
    fprintf(stderr,
            "usage: %s [--checkpoint SAVE RESTORE] [--hidden F] [--jitter F] [--bursty] [--shift F]\n"
            "          [--depth-decay F] [--refeeds] [--repeats N]\n"
            "          T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED\n",
            argv0);
    return 2;
}

int main(int argc, char ** argv) {
    struct regime g       = { .jitter = 0.05, .depth_decay = 1.0 };
    int           repeats = 1, i = 1;
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
        } else if (strcmp(o, "--repeats") == 0 && more) {
            repeats = atoi(argv[++i]);
        } else if (strcmp(o, "--bursty") == 0) {
            g.bursty = true;
        } else if (strcmp(o, "--depth-decay") == 0 && more) {
            g.depth_decay = atof(argv[++i]);
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
        simulate(&g, -1, kmax, rounds, seed + rep, &achieved);
    }
    int    best_k = 0;
    double best   = 0.0;
    for (int k = 0; k <= kmax; k++) {
        struct totals t = { 0 };
        for (int rep = 0; rep < repeats; rep++) {
            simulate(&g, k, kmax, rounds, seed + rep, &t);
        }
        if (t.tokens / t.seconds > best) {
            best   = t.tokens / t.seconds;
            best_k = k;
        }
    }
    printf("achieved %.6f best %.6f best_k %d\n", achieved.tokens / achieved.seconds, best, best_k);
    return 0;
}
