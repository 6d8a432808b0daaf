/* draft_length_sim.c - drive the auto draft-length chooser with simulated
 * costs and acceptances, and print what it achieved next to the best fixed k
 * run through the same simulation.
 *
 *   draft_length_sim T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED [T_SAVE T_RESTORE]
 *
 * Verify time of a batch of n is T_VERIFY1 + SLOPE * (n - 1); each draft token
 * is accepted with probability ACCEPTANCE until the first rejection; T_DRAFT is
 * per token the draft evaluates. With T_SAVE and T_RESTORE the target keeps
 * recurrent state without snapshots, like the loop: every drafting round saves
 * a checkpoint, a partial acceptance restores it and puts the accepted tokens
 * and the next one into the next batch. Prints
 * "achieved <tokens/s> best <tokens/s> best_k <k>". */
#include "draft_length.h"

#include <stdio.h>
#include <stdlib.h>

struct costs {
    double td, t1, slope, a, save, restore;
    bool   checkpoints;
};

/* tokens per second over `rounds` rounds: auto when k_fixed < 0 */
static double simulate(const struct costs * c, int k_fixed, int kmax, int rounds, uint64_t seed) {
    uint64_t rng = 0;
    pymoe_rng_seed(&rng, seed);
    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, kmax);
    if (c->checkpoints) {
        d.target_rewind = 0;
    }
    double tokens = 0.0, seconds = 0.0;
    int    all_accepted = 0, refed = 0;
    for (int r = 0; r < rounds; r++) {
        int k     = k_fixed >= 0 ? k_fixed : pymoe_draft_length_choose(&d);
        int n_acc = 0;
        while (n_acc < k && pymoe_rng_uniform(&rng) < c->a) {
            n_acc++;
        }
        double noise     = 0.95 + 0.1 * pymoe_rng_uniform(&rng); /* +-5% timing noise */
        int    evaluated = k > 0 ? k + all_accepted : 0;
        int    batch     = refed + 1 + k;
        bool   restore   = c->checkpoints && n_acc < k;
        struct pymoe_round_cost rc = {
            .n_draft                = k,
            .n_accepted             = n_acc,
            .draft_tokens           = evaluated,
            .catchup_tokens         = k > 0 ? 1 + all_accepted : 0,
            .batch_tokens           = batch,
            .draft_seconds          = evaluated * c->td * noise,
            .verify_seconds         = (c->t1 + c->slope * (batch - 1)) * noise,
            .target_save_seconds    = c->checkpoints && k > 0 ? c->save * noise : 0.0,
            .target_restore_seconds = restore ? c->restore * noise : 0.0,
        };
        all_accepted = k > 0 && n_acc == k;
        refed        = restore ? refed + n_acc + 1 : 0;
        if (refed > kmax) { /* the loop evaluates a long backlog at once */
            rc.target_restore_seconds += (c->t1 + c->slope * (refed - 1)) * noise;
            refed = 0;
        }
        pymoe_draft_length_update(&d, &rc);
        tokens += n_acc + 1;
        seconds += rc.draft_seconds + rc.verify_seconds + rc.target_save_seconds + rc.target_restore_seconds;
    }
    return tokens / seconds;
}

int main(int argc, char ** argv) {
    if (argc != 8 && argc != 10) {
        fprintf(stderr, "usage: %s T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED [T_SAVE T_RESTORE]\n",
                argv[0]);
        return 2;
    }
    struct costs c = { atof(argv[1]), atof(argv[2]), atof(argv[3]), atof(argv[4]), 0.0, 0.0, false };
    if (argc == 10) {
        c.save        = atof(argv[8]);
        c.restore     = atof(argv[9]);
        c.checkpoints = true;
    }
    int      kmax = atoi(argv[5]), rounds = atoi(argv[6]);
    uint64_t seed = (uint64_t) atoll(argv[7]);

    double achieved = simulate(&c, -1, kmax, rounds, seed);
    int    best_k   = 0;
    double best     = 0.0;
    for (int k = 0; k <= kmax; k++) {
        double x = simulate(&c, k, kmax, rounds * 4, seed + 1000);
        if (x > best) {
            best   = x;
            best_k = k;
        }
    }
    printf("achieved %.6f best %.6f best_k %d\n", achieved, best, best_k);
    return 0;
}
