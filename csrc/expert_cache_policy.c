/* expert_cache_policy.c - which experts one layer's cache holds: a pure
 * least-recently-used rule over decodes, with a cap on the experts copied in
 * per decode. The loaded cache (expert_cache.c) and the replay of a routing
 * trace (pymoe_moe_cache_replay, for predicting a hit rate before loading)
 * run this same code, so a replay counts exactly what a session measures. */
#include "expert_cache_policy.h"

#include "internal.h"

#include <stdlib.h>
#include <string.h>

bool pymoe_lru_init(struct pymoe_lru * c, int32_t n_experts, int32_t n_slots, int32_t upload_cap) {
    memset(c, 0, sizeof(*c));
    c->n_experts  = n_experts;
    c->n_slots    = n_slots;
    c->upload_cap = upload_cap;
    c->slot_of    = malloc(sizeof(*c->slot_of) * (size_t) n_experts);
    c->count      = calloc((size_t) n_experts, sizeof(*c->count));
    c->missed     = malloc(sizeof(*c->missed) * (size_t) n_experts);
    c->expert_in  = malloc(sizeof(*c->expert_in) * (size_t) n_slots);
    c->last_used  = calloc((size_t) n_slots, sizeof(*c->last_used));
    if (!c->slot_of || !c->count || !c->missed || !c->expert_in || !c->last_used) {
        pymoe_lru_free(c);
        return false;
    }
    for (int32_t e = 0; e < n_experts; e++) {
        c->slot_of[e] = -1;
    }
    for (int32_t i = 0; i < n_slots; i++) {
        c->expert_in[i] = -1;
    }
    return true;
}

void pymoe_lru_free(struct pymoe_lru * c) {
    free(c->slot_of);
    free(c->count);
    free(c->missed);
    free(c->expert_in);
    free(c->last_used);
    memset(c, 0, sizeof(*c));
}

/* The slot a new expert goes to: a free one, else the least recently used
 * one that this decode did not use; -1 when every slot was used by it. */
static int32_t victim(const struct pymoe_lru * c) {
    int32_t best = -1;
    for (int32_t i = 0; i < c->n_slots; i++) {
        if (c->expert_in[i] < 0) {
            return i;
        }
        if (c->last_used[i] < c->clock && (best < 0 || c->last_used[i] < c->last_used[best])) {
            best = i;
        }
    }
    return best;
}

int32_t pymoe_lru_step(struct pymoe_lru * c, const int32_t * ids, int32_t n_ids, struct pymoe_lru_upload * uploads,
                       struct pymoe_lru_result * out) {
    memset(out, 0, sizeof(*out));
    c->clock++;
    /* hits and misses against what the cache held while the decode ran */
    int32_t n_missed = 0;
    for (int32_t i = 0; i < n_ids; i++) {
        const int32_t e = ids[i];
        if (e < 0 || e >= c->n_experts) {
            out->misses++;
            continue;
        }
        if (c->count[e]++ == 0) {
            out->distinct++;
            if (c->slot_of[e] >= 0) {
                c->last_used[c->slot_of[e]] = c->clock;
            } else {
                c->missed[n_missed++] = e;
            }
        }
        if (c->slot_of[e] >= 0) {
            out->hits++;
        } else {
            out->misses++;
        }
    }
    out->distinct_missed = n_missed;
    /* copy in the missed experts, the most used first (ties: the first seen) */
    int32_t n_up = 0;
    const int32_t cap = c->upload_cap > 0 ? c->upload_cap : n_missed;
    while (n_up < cap && n_up < n_missed) {
        int32_t best = n_up;
        for (int32_t j = n_up + 1; j < n_missed; j++) {
            if (c->count[c->missed[j]] > c->count[c->missed[best]]) {
                best = j;
            }
        }
        const int32_t e = c->missed[best];
        c->missed[best] = c->missed[n_up];
        c->missed[n_up] = e;
        const int32_t slot = victim(c);
        if (slot < 0) {
            break;
        }
        if (c->expert_in[slot] >= 0) {
            c->slot_of[c->expert_in[slot]] = -1;
        }
        c->expert_in[slot] = e;
        c->slot_of[e]      = slot;
        c->last_used[slot] = c->clock;
        uploads[n_up].expert = e;
        uploads[n_up].slot   = slot;
        n_up++;
    }
    for (int32_t i = 0; i < n_ids; i++) {
        if (ids[i] >= 0 && ids[i] < c->n_experts) {
            c->count[ids[i]] = 0;
        }
    }
    out->uploads = n_up;
    return n_up;
}

int32_t pymoe_moe_cache_replay(int32_t n_experts, int32_t n_used, int32_t n_slots, int32_t upload_cap,
                               const int32_t * ids, const int32_t * step_tokens, int32_t n_steps,
                               struct pymoe_moe_cache_stats * out) {
    if (!out || n_steps < 0 || (n_steps > 0 && (!ids || !step_tokens))) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: NULL argument");
    }
    if (n_experts <= 0 || n_used <= 0 || n_slots <= 0 || upload_cap < 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: need n_experts, n_used and n_slots > 0 and "
                          "upload_cap >= 0 (got %d, %d, %d, %d)", n_experts, n_used, n_slots, upload_cap);
    }
    int64_t longest = 0;
    for (int32_t i = 0; i < n_steps; i++) {
        if (step_tokens[i] <= 0) {
            return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: step %d has %d tokens", i, step_tokens[i]);
        }
        longest = step_tokens[i] > longest ? step_tokens[i] : longest;
    }
    struct pymoe_lru          c;
    struct pymoe_lru_upload * up = malloc(sizeof(*up) * (size_t) (longest * n_used + 1));
    if (!up || !pymoe_lru_init(&c, n_experts, n_slots < n_experts ? n_slots : n_experts, upload_cap)) {
        free(up);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    const int32_t * at = ids;
    for (int32_t i = 0; i < n_steps; i++) {
        struct pymoe_lru_result r;
        const int32_t           n = step_tokens[i] * n_used;
        pymoe_lru_step(&c, at, n, up, &r);
        at += n;
        out->steps++;
        out->tokens += (uint64_t) step_tokens[i];
        out->hits += (uint64_t) r.hits;
        out->misses += (uint64_t) r.misses;
        out->uploads += (uint64_t) r.uploads;
        out->uploaded_bytes += (uint64_t) r.uploads;
        out->host_experts += (uint64_t) r.distinct_missed;
        out->host_expert_bytes += (uint64_t) r.distinct_missed;
        out->uncached_expert_bytes += (uint64_t) r.distinct;
    }
    pymoe_lru_free(&c);
    free(up);
    return pymoe_ok();
}
