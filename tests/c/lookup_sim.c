/* lookup_sim.c - drive the lookup draft-length choice (draft_length.c) through
 * a simulated generation and print what it achieved next to plain decoding
 * and next to every fixed draft length run through the same text.
 *
 *   lookup_sim SLOPE COPY_SHARE COPY_ACCEPT FREE_MATCH FREE_ACCEPT TOKENS SEED [HICCUP [STALE]]
 *
 * The text is decided in advance, token by token, so every policy meets the
 * same one: copies (runs of 40-200 tokens, COPY_SHARE of the text) whose
 * lookup proposals are right with probability COPY_ACCEPT per token, and free
 * text where a short match (2-3 tokens) turns up at FREE_MATCH of the
 * positions with proposals right with probability FREE_ACCEPT. A verify batch
 * of n costs 1 + SLOPE * (n - 1) (one token: 1), times a 5% jitter; each round
 * costs 0.02 more (sampling, bookkeeping). HICCUP (default 0): seconds the
 * first drafting round takes that no component names (a page fault, another
 * process), paid by every policy once. STALE (default 0): auto starts warm
 * from an earlier run's costs (this text's batch curve) whose lookup rounds
 * took STALE more than any component names (a busier day).
 * Prints "plain <tokens/s> auto <tokens/s> best <tokens/s> best_k <k>". */
#include "draft_length.h"

#include <stdio.h>
#include <stdlib.h>

enum { K_MAX = 16, N_MIN = 2, N_MAX = 12 };

/* a uniform in [0, 1) that depends only on its arguments (splitmix64) */
static double uniform(uint64_t seed, uint64_t a, uint64_t b) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + a * 0xbf58476d1ce4e5b9ull + b * 0x94d049bb133111ebull + 1;
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double) (z >> 11) / 9007199254740992.0;
}

struct text {
    int32_t * copied;  /* per position: tokens of the copy so far (-1: free text) */
    int32_t   n;
};

static void make_text(struct text * t, double copy_share, int32_t n, uint64_t seed) {
    t->n      = n;
    t->copied = malloc(sizeof(int32_t) * (size_t) (n + K_MAX + 2));
    int32_t pos = 0;
    for (int32_t seg = 0; pos < n + K_MAX + 2; seg++) {
        const bool    copy   = uniform(seed, 1000000 + seg, 0) < copy_share;
        const int32_t length = copy ? 40 + (int32_t) (160 * uniform(seed, 1000000 + seg, 1))
                                    : 40 + (int32_t) (160 * uniform(seed, 1000000 + seg, 2));
        for (int32_t i = 0; i < length && pos < n + K_MAX + 2; i++) {
            t->copied[pos++] = copy ? i : -1;
        }
    }
}

static void warm_from_stale(struct pymoe_draft_length * d, double slope, double stale) {
    struct pymoe_draft_length learned;
    pymoe_draft_length_init(&learned, K_MAX);
    for (int32_t n = 1; n <= K_MAX + 1; n++) {
        learned.verify_mean[n]  = 1.0 + slope * (n - 1);
        learned.verify_count[n] = 10;
    }
    learned.unnamed_mean[2]  = stale;
    learned.unnamed_count[2] = 10;
    pymoe_draft_length_warm_start(d, &learned);
}

/* One generation of the text: fixed k when k_fixed >= 0, else auto. */
static void run(const struct text * t, double slope, double copy_accept, double free_match, double free_accept,
                double hiccup, double stale, int32_t k_fixed, uint64_t seed, double * tokens, double * seconds) {
    struct pymoe_draft_length d;
    pymoe_draft_length_init(&d, K_MAX);
    if (k_fixed < 0 && stale > 0.0) {
        warm_from_stale(&d, slope, stale);
    }
    bool copying = false;
    *tokens = *seconds = 0.0;
    for (int32_t pos = 0, r = 0; pos < t->n; r++) {
        /* what lookup offers here: a match length (0: none) and whether each proposal is right */
        int32_t length = 0;
        double  right  = 0.0;
        if (t->copied[pos] >= 0) {  /* the copy's source is matched once a few tokens are copied */
            length = t->copied[pos] >= N_MIN ? (t->copied[pos] + 1 < N_MAX ? t->copied[pos] + 1 : N_MAX) : 0;
            right  = copy_accept;
        } else if (uniform(seed, (uint64_t) pos, 1) < free_match) {
            length = uniform(seed, (uint64_t) pos, 2) < 0.7 ? 2 : 3;
            right  = free_accept;
        }
        int32_t k = 0;
        if (length > 0) {
            k = k_fixed >= 0 ? k_fixed
                             : pymoe_draft_length_choose_lookup(&d, copying ? PYMOE_LOOKUP_CONTINUES : length, K_MAX);
        }
        int32_t accepted = 0;
        /* a copy's proposals can be right only within the copy, free text's within free text */
        while (accepted < k &&
               t->copied[pos + accepted] == (t->copied[pos] >= 0 ? t->copied[pos] + accepted : -1) &&
               uniform(seed, (uint64_t) (pos + accepted), 3) < right) {
            accepted++;
        }
        const double noise = 0.95 + 0.1 * uniform(seed, (uint64_t) r, 4 + (uint64_t) k);
        const double batch = (1.0 + slope * k) * noise;
        const double blip  = k > 0 ? hiccup : 0.0;
        hiccup             = k > 0 ? 0.0 : hiccup;
        struct pymoe_round_cost c = {
            .n_draft = k, .n_accepted = accepted, .batch_tokens = k + 1, .source = 0, .lookup_arm = 0,
            .verify_seconds = batch, .other_seconds = 0.02, .round_seconds = batch + 0.02 + blip,
        };
        if (k > 0) {
            c.source     = PYMOE_DRAFT_LOOKUP;
            c.lookup_arm = copying ? PYMOE_LOOKUP_CONTINUES : length;
        }
        pymoe_draft_length_update(&d, &c);
        copying = k > 0 && accepted == k;
        pos += accepted + 1;
        *tokens += accepted + 1;
        *seconds += batch + 0.02 + blip;
    }
}

int main(int argc, char ** argv) {
    if (argc < 8 || argc > 10) {
        fprintf(stderr, "usage: lookup_sim SLOPE COPY_SHARE COPY_ACCEPT FREE_MATCH FREE_ACCEPT TOKENS SEED "
                        "[HICCUP [STALE]]\n");
        return 2;
    }
    const double   slope = atof(argv[1]), share = atof(argv[2]), copy_accept = atof(argv[3]);
    const double   free_match = atof(argv[4]), free_accept = atof(argv[5]);
    const int32_t  n    = atoi(argv[6]);
    const uint64_t seed = strtoull(argv[7], NULL, 10);
    const double   hiccup = argc >= 9 ? atof(argv[8]) : 0.0;
    const double   stale  = argc >= 10 ? atof(argv[9]) : 0.0;
    struct text    t;
    make_text(&t, share, n, seed);
    double tok, sec, best = 0.0, plain = 0.0;
    int    best_k = 0;
    for (int32_t k = 0; k <= K_MAX; k++) {
        run(&t, slope, copy_accept, free_match, free_accept, hiccup, stale, k, seed, &tok, &sec);
        if (k == 0) {
            plain = tok / sec;
        }
        if (tok / sec > best) {
            best   = tok / sec;
            best_k = k;
        }
    }
    run(&t, slope, copy_accept, free_match, free_accept, hiccup, stale, -1, seed, &tok, &sec);
    printf("plain %.4f auto %.4f best %.4f best_k %d\n", plain, tok / sec, best, best_k);
    free(t.copied);
    return 0;
}
