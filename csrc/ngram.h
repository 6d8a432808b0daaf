/* ngram.h - drafts copied from the context: an incremental n-gram index over
 * the sequence (internal; pure, no llama.cpp). */
#ifndef PYMOE_NGRAM_H
#define PYMOE_NGRAM_H

#include "pymoe.h"

/* The sequence, and every n_min-gram in it that something followed: a hash
 * table from the n-gram to the position where it last ended, and from each
 * position back to the one before with the same n-gram. Appending a token
 * indexes one n-gram; a lookup reads a bounded number of earlier
 * occurrences, so neither grows with the context. */
struct pymoe_ngram {
    int32_t       n_min, n_max;
    pymoe_token * tokens;   /* the sequence */
    int32_t       n, cap;
    int32_t *     prev;     /* prev[e]: the previous end of the n_min-gram ending at e, or -1 */
    int32_t *     table;    /* open addressing: the newest end of an n_min-gram, or -1 (empty) */
    int32_t       table_size, n_keys;
    int32_t       indexed;  /* n-grams ending before this position are in the table */
};

/* n_min in [1, n_max], n_max <= PYMOE_NGRAM_MAX (checked by the caller). */
int32_t pymoe_ngram_init(struct pymoe_ngram * g, int32_t n_min, int32_t n_max);
void    pymoe_ngram_free(struct pymoe_ngram * g);
void    pymoe_ngram_clear(struct pymoe_ngram * g);  /* an empty sequence */
/* Room for n more tokens (PYMOE_ENOMEM, no message), after which appending them cannot fail. */
int32_t pymoe_ngram_reserve(struct pymoe_ngram * g, int32_t n);
int32_t pymoe_ngram_append(struct pymoe_ngram * g, const pymoe_token * tokens, int32_t n);

/* The longest suffix of the sequence (at least n_min tokens, counted up to
 * n_max) that occurred before, and up to max_draft tokens of what followed
 * it there (the newest of the longest occurrences), into out. Returns the
 * tokens proposed (0: no match) and the match length in *match_length.
 * A continuation that runs into the suffix itself repeats the proposal, as
 * a copy of a repeating text would. */
int32_t pymoe_ngram_lookup(const struct pymoe_ngram * g, int32_t max_draft, pymoe_token * out,
                           int32_t * match_length);

#endif
