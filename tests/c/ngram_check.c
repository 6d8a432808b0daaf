/* ngram_check.c - the lookup index (csrc/ngram.c) against a brute-force
 * search over random sequences, appended in random pieces.
 *
 *   ngram_check SEED CASES   prints "ok CASES" or the first difference, exit 1
 *
 * The oracle: among the newest 64 earlier positions whose n_min tokens end
 * like the sequence, the one whose match with the sequence's end is longest
 * (counted up to n_max; ties: the newest), and what followed it, repeating
 * the proposal where it runs into the sequence's end. */
#include "ngram.h"

#include <stdio.h>
#include <stdlib.h>

static uint64_t state;

static uint32_t next_random(void) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t) (state >> 33);
}

static int32_t oracle(const pymoe_token * t, int32_t n, int32_t n_min, int32_t n_max, int32_t max_draft,
                      pymoe_token * out, int32_t * match_length) {
    *match_length = 0;
    const int32_t last = n - 1;
    int32_t       best = -1, best_len = 0, seen = 0;
    for (int32_t end = n - 2; end >= n_min - 1 && seen < 64 && max_draft > 0; end--) {
        int32_t len = 0;
        while (len < n_max && end - len >= 0 && t[end - len] == t[last - len]) {
            len++;
        }
        if (len < n_min) {
            continue;
        }
        seen++;
        if (len > best_len) {
            best     = end;
            best_len = len;
        }
    }
    if (best < 0) {
        return 0;
    }
    for (int32_t i = 0; i < max_draft; i++) {
        out[i] = i < last - best ? t[best + 1 + i] : out[i - (last - best)];
    }
    *match_length = best_len;
    return max_draft;
}

/* Appends a random sequence of `length` tokens in pieces, checking a lookup
 * after each piece; 0 when every lookup matched the oracle. */
static int check_sequence(struct pymoe_ngram * g, int32_t c, int32_t alphabet, int32_t length) {
    static pymoe_token seq[3000];
    pymoe_token        got[40], want[40];
    for (int32_t n = 0; n < length;) {
        int32_t piece = 1 + (int32_t) (next_random() % 40);  /* a feed, or a round's tokens */
        piece         = piece > length - n ? length - n : piece;
        for (int32_t i = 0; i < piece; i++) {
            /* copies of earlier stretches now and then, as in text that quotes itself */
            seq[n + i] = n + i > 20 && next_random() % 4 != 0 ? seq[n + i - 1 - (int32_t) (next_random() % 20)]
                                                               : (pymoe_token) (next_random() % alphabet);
        }
        if (pymoe_ngram_append(g, seq + n, piece) != PYMOE_OK) {
            printf("case %d: append failed\n", c);
            return 1;
        }
        n += piece;
        const int32_t max_draft = (int32_t) (next_random() % 31);
        int32_t       len_got, len_want;
        int32_t       k_got  = pymoe_ngram_lookup(g, max_draft, got, &len_got);
        int32_t       k_want = oracle(seq, n, g->n_min, g->n_max, max_draft, want, &len_want);
        int32_t       same   = k_got == k_want && len_got == len_want;
        for (int32_t i = 0; same && i < k_got; i++) {
            same = got[i] == want[i];
        }
        if (!same) {
            printf("case %d (n_min %d, n_max %d, alphabet %d), after %d tokens, max_draft %d: index proposed %d "
                   "tokens from a match of %d, the oracle %d from %d\n",
                   c, g->n_min, g->n_max, alphabet, n, max_draft, k_got, len_got, k_want, len_want);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char ** argv) {
    state               = argc > 1 ? strtoull(argv[1], NULL, 10) : 1;
    const int32_t cases = argc > 2 ? atoi(argv[2]) : 200;
    for (int32_t c = 0; c < cases; c++) {
        const int32_t n_max    = 1 + (int32_t) (next_random() % PYMOE_NGRAM_MAX);
        const int32_t n_min    = 1 + (int32_t) (next_random() % (uint32_t) n_max);
        const int32_t alphabet = 2 + (int32_t) (next_random() % 12);  /* small: long and many matches */
        struct pymoe_ngram g;
        if (pymoe_ngram_init(&g, n_min, n_max) != PYMOE_OK) {
            printf("init failed\n");
            return 1;
        }
        /* the second sequence after a clear: an index reset for a new sequence knows nothing of the old one */
        for (int32_t pass = 0; pass < 2; pass++) {
            if (check_sequence(&g, c, alphabet, 1 + (int32_t) (next_random() % 2999)) != 0) {
                return 1;
            }
            pymoe_ngram_clear(&g);
            pymoe_token out[4];
            int32_t     len;
            if (pymoe_ngram_lookup(&g, 4, out, &len) != 0 || len != 0) {
                printf("case %d: a cleared index proposed\n", c);
                return 1;
            }
        }
        pymoe_ngram_free(&g);
    }
    printf("ok %d\n", cases);
    return 0;
}
