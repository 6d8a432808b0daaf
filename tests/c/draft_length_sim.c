/* draft_length_sim.c - drive the auto draft-length chooser with simulated
 * costs and acceptances, and print what it achieved next to the best fixed k.
 *
 *   draft_length_sim T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED
 *
 * Verify time of a batch of n is T_VERIFY1 + SLOPE * (n - 1); each draft token
 * is accepted with probability ACCEPTANCE until the first rejection; T_DRAFT is
 * per token the draft evaluates. Prints
 * "achieved <tokens/s> best <tokens/s> best_k <k>". */
#include "draft_length.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Like the loop: the draft evaluates k tokens, plus the last draft token when
 * the previous round accepted all of its drafts. */
static double rate(double td, double t1, double slope, double a, int k) {
    double tokens = a < 1.0 ? (1.0 - pow(a, k + 1)) / (1.0 - a) : k + 1;
    return tokens / ((k > 0 ? k + pow(a, k) : 0) * td + t1 + slope * k);
}

int main(int argc, char ** argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s T_DRAFT T_VERIFY1 SLOPE ACCEPTANCE K_MAX ROUNDS SEED\n", argv[0]);
        return 2;
    }
    double td = atof(argv[1]), t1 = atof(argv[2]), slope = atof(argv[3]), a = atof(argv[4]);
    int    kmax = atoi(argv[5]), rounds = atoi(argv[6]);
    uint64_t rng = 0;
    pymoe_rng_seed(&rng, (uint64_t) atoll(argv[7]));

    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, kmax);
    double tokens = 0.0, seconds = 0.0;
    int    all_accepted = 0;
    for (int r = 0; r < rounds; r++) {
        int k = pymoe_draft_length_choose(&d);
        int n_acc = 0;
        while (n_acc < k && pymoe_rng_uniform(&rng) < a) {
            n_acc++;
        }
        double noise = 0.95 + 0.1 * pymoe_rng_uniform(&rng);  /* +-5% timing noise */
        int evaluated = k > 0 ? k + all_accepted : 0;
        struct pymoe_round_cost c = { k, n_acc, evaluated, k > 0 ? 1 + all_accepted : 0, 0, 0, evaluated * td * noise,
                                      (t1 + slope * k) * noise, 0.0 };
        all_accepted = k > 0 && n_acc == k;
        pymoe_draft_length_update(&d, &c);
        tokens += n_acc + 1;
        seconds += c.draft_seconds + c.verify_seconds;
    }
    int    best_k = 0;
    double best   = 0.0;
    for (int k = 0; k <= kmax; k++) {
        double x = rate(td, t1, slope, a, k);
        if (x > best) {
            best   = x;
            best_k = k;
        }
    }
    printf("achieved %.6f best %.6f best_k %d\n", tokens / seconds, best, best_k);
    return 0;
}
