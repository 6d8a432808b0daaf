/* ngram.c - the n-gram index behind drafts copied from the context. Errors
 * are codes only (no message state): the caller words them. */
#include "ngram.h"

#include <stdlib.h>
#include <string.h>

/* earlier occurrences a lookup compares: enough to find the longest match in
 * text that repeats, few enough that a round costs microseconds */
enum { MAX_CANDIDATES = 64, MIN_TABLE = 1024 };

static uint32_t hash_at(const struct pymoe_ngram * g, int32_t end) {
    uint32_t h = 2166136261u;
    for (int32_t i = end - g->n_min + 1; i <= end; i++) {
        h = (h ^ (uint32_t) g->tokens[i]) * 16777619u;
        h ^= h >> 15;
    }
    return h;
}

static bool same_gram(const struct pymoe_ngram * g, int32_t a, int32_t b) {
    return memcmp(g->tokens + a - g->n_min + 1, g->tokens + b - g->n_min + 1, sizeof(pymoe_token) * g->n_min) == 0;
}

/* The slot holding the n-gram that ends at `end`, or the empty slot where it goes. */
static int32_t slot_of(const struct pymoe_ngram * g, int32_t end) {
    const uint32_t mask = (uint32_t) g->table_size - 1;
    for (uint32_t i = hash_at(g, end) & mask;; i = (i + 1) & mask) {
        if (g->table[i] < 0 || same_gram(g, g->table[i], end)) {
            return (int32_t) i;
        }
    }
}

static int32_t grow_table(struct pymoe_ngram * g) {
    int32_t * old      = g->table;
    int32_t   old_size = g->table_size;
    int32_t   size     = old_size ? old_size * 2 : MIN_TABLE;
    g->table           = malloc(sizeof(*g->table) * (size_t) size);
    if (!g->table) {
        g->table = old;
        return PYMOE_ENOMEM;
    }
    memset(g->table, 0xff, sizeof(*g->table) * (size_t) size);  /* -1: empty */
    g->table_size = size;
    for (int32_t i = 0; i < old_size; i++) {
        if (old[i] >= 0) {
            g->table[slot_of(g, old[i])] = old[i];
        }
    }
    free(old);
    return PYMOE_OK;
}

int32_t pymoe_ngram_init(struct pymoe_ngram * g, int32_t n_min, int32_t n_max) {
    memset(g, 0, sizeof(*g));
    g->n_min = n_min;
    g->n_max = n_max;
    return grow_table(g);
}

void pymoe_ngram_free(struct pymoe_ngram * g) {
    free(g->tokens);
    free(g->prev);
    free(g->table);
    memset(g, 0, sizeof(*g));
}

void pymoe_ngram_clear(struct pymoe_ngram * g) {
    g->n       = 0;
    g->indexed = 0;
    g->n_keys  = 0;
    memset(g->table, 0xff, sizeof(*g->table) * (size_t) g->table_size);
}

int32_t pymoe_ngram_reserve(struct pymoe_ngram * g, int32_t n) {
    if (n <= 0) {
        return PYMOE_OK;
    }
    if (n > INT32_MAX / 4 - g->n) {
        return PYMOE_ENOMEM;
    }
    if (g->n + n > g->cap) {
        int32_t cap = g->cap ? g->cap : 256;
        while (cap < g->n + n) {
            cap *= 2;
        }
        pymoe_token * grown = realloc(g->tokens, sizeof(*grown) * (size_t) cap);
        g->tokens           = grown ? grown : g->tokens;
        int32_t * prev      = realloc(g->prev, sizeof(*prev) * (size_t) cap);
        g->prev             = prev ? prev : g->prev;
        if (!grown || !prev) {
            return PYMOE_ENOMEM;
        }
        g->cap = cap;
    }
    while (2 * (g->n_keys + n) > g->table_size) {  /* at most half full */
        int32_t rc = grow_table(g);
        if (rc != PYMOE_OK) {
            return rc;
        }
    }
    return PYMOE_OK;
}

int32_t pymoe_ngram_append(struct pymoe_ngram * g, const pymoe_token * tokens, int32_t n) {
    int32_t rc = pymoe_ngram_reserve(g, n);
    if (rc != PYMOE_OK || n <= 0) {
        return rc;
    }
    memcpy(g->tokens + g->n, tokens, sizeof(*tokens) * (size_t) n);
    g->n += n;
    /* index the n-grams that now have a token after them */
    for (int32_t end = g->indexed; end + 1 < g->n; end++) {
        if (end + 1 >= g->n_min) {
            const int32_t slot = slot_of(g, end);
            g->n_keys += g->table[slot] < 0;
            g->prev[end]   = g->table[slot];
            g->table[slot] = end;
        }
    }
    g->indexed = g->n - 1;
    return PYMOE_OK;
}

int32_t pymoe_ngram_lookup(const struct pymoe_ngram * g, int32_t max_draft, pymoe_token * out,
                           int32_t * match_length) {
    *match_length = 0;
    const int32_t last = g->n - 1;
    if (max_draft <= 0 || g->n <= g->n_min || g->indexed < g->n_min) {
        return 0;
    }
    /* the suffix is not in the table (nothing follows it yet): find its slot by hand */
    const uint32_t mask = (uint32_t) g->table_size - 1;
    int32_t        end  = -1;
    for (uint32_t i = hash_at(g, last) & mask; g->table[i] >= 0; i = (i + 1) & mask) {
        if (same_gram(g, g->table[i], last)) {
            end = g->table[i];
            break;
        }
    }
    int32_t best = -1, best_len = 0;
    for (int32_t seen = 0; end >= 0 && seen < MAX_CANDIDATES; end = g->prev[end], seen++) {
        int32_t len = g->n_min;
        while (len < g->n_max && end - len >= 0 && g->tokens[end - len] == g->tokens[last - len]) {
            len++;
        }
        if (len > best_len) {  /* ties: the newest, seen first */
            best     = end;
            best_len = len;
        }
    }
    if (best < 0) {
        return 0;
    }
    const int32_t period = last - best;  /* tokens between the match and the suffix */
    for (int32_t i = 0; i < max_draft; i++) {
        out[i] = i < period ? g->tokens[best + 1 + i] : out[i - period];
    }
    *match_length = best_len;
    return max_draft;
}
