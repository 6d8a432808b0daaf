/* draft_length_depth.c - what the chooser believes of the first draft depth
 * (csrc/draft_length.c) after two MTP rounds whose first drafts were both
 * rejected, then a catch-up's acceptance tests (each a test of a first
 * draft), all passed.
 *
 *   draft_length_depth TESTS   prints "pooled <a> depth1 <a1>" after them */
#include "draft_length.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s TESTS\n", argv[0]);
        return 2;
    }
    const int tests = atoi(argv[1]);
    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, 8);
    d.model_source = PYMOE_DRAFT_MTP;
    for (int i = 0; i < 2; i++) {  /* k = 2, the first draft rejected */
        const struct pymoe_round_cost c = { .n_draft = 2, .n_accepted = 0, .draft_tokens = 2, .catchup_tokens = 1,
                                            .batch_tokens = 3, .source = PYMOE_DRAFT_MTP, .draft_seconds = 0.002,
                                            .verify_seconds = 0.04, .round_seconds = 0.042 };
        pymoe_draft_length_update(&d, &c);
    }
    for (int left = tests; left > 0; left -= 8) {  /* plain rounds, each with a catch-up of up to 8 tests */
        const int                     n = left < 8 ? left : 8;
        const struct pymoe_round_cost c = { .extra_tests = n, .extra_passed = n, .batch_tokens = 1,
                                            .verify_seconds = 0.02, .round_seconds = 0.02 };
        pymoe_draft_length_update(&d, &c);
    }
    printf("pooled %.4f depth1 %.4f\n", pymoe_draft_length_acceptance(&d), pymoe_draft_length_depth_acceptance(&d, 1));
    return 0;
}
