/* expert_cache_policy.c - which experts one layer's cache holds: decayed use
 * counts. Every use of an expert adds 1 to its score, and every decode
 * multiplies all scores by the decay. After a decode, its missed experts (the
 * highest scores first, at most upload_cap) are copied in while one beats the
 * lowest score among the held experts that decode did not use, which it
 * replaces. A copy costs more than computing the expert from host memory
 * once, so an expert is copied only when it has been used more, lately, than
 * what it evicts; with a small decay (recency counts most) this is close to
 * least-recently-used. The loaded cache (expert_cache.c) and the replay of a
 * routing trace (pymoe_moe_cache_replay, for predicting a hit rate before
 * loading) run this same code, so a replay counts exactly what a session
 * measures. */
#include "expert_cache_policy.h"

#include "internal.h"

#include <stdlib.h>
#include <string.h>

bool pymoe_cache_policy_init(struct pymoe_cache_policy * c, int32_t n_experts, int32_t n_slots, int32_t upload_cap,
                             double decay) {
    memset(c, 0, sizeof(*c));
    c->n_experts  = n_experts;
    c->n_slots    = n_slots;
    c->upload_cap = upload_cap;
    c->decay      = decay > 0.0 && decay < 1.0 ? decay : PYMOE_CACHE_DECAY;
    c->unit       = 1.0;
    c->score      = calloc((size_t) n_experts, sizeof(*c->score));
    c->slot_of    = malloc(sizeof(*c->slot_of) * (size_t) n_experts);
    c->count      = calloc((size_t) n_experts, sizeof(*c->count));
    c->missed     = malloc(sizeof(*c->missed) * (size_t) n_experts);
    c->expert_in  = malloc(sizeof(*c->expert_in) * (size_t) n_slots);
    c->last_used  = calloc((size_t) n_slots, sizeof(*c->last_used));
    if (!c->score || !c->slot_of || !c->count || !c->missed || !c->expert_in || !c->last_used) {
        pymoe_cache_policy_free(c);
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

void pymoe_cache_policy_free(struct pymoe_cache_policy * c) {
    free(c->score);
    free(c->slot_of);
    free(c->count);
    free(c->missed);
    free(c->expert_in);
    free(c->last_used);
    memset(c, 0, sizeof(*c));
}

/* One decode later: a use now counts 1/decay times what it counted before.
 * Scores are rescaled before the unit grows past what a double holds. */
static void advance(struct pymoe_cache_policy * c) {
    c->unit /= c->decay;
    if (c->unit > 1e200) {
        for (int32_t e = 0; e < c->n_experts; e++) {
            c->score[e] /= c->unit;
        }
        c->unit = 1.0;
    }
}

/* The slot a new expert goes to: a free one, else the held expert with the
 * lowest score that this decode did not use; -1 when every slot was used by it. */
static int32_t victim(const struct pymoe_cache_policy * c) {
    int32_t best = -1;
    for (int32_t i = 0; i < c->n_slots; i++) {
        if (c->expert_in[i] < 0) {
            return i;
        }
        if (c->last_used[i] < c->clock && (best < 0 || c->score[c->expert_in[i]] < c->score[c->expert_in[best]])) {
            best = i;
        }
    }
    return best;
}

int32_t pymoe_cache_policy_step(struct pymoe_cache_policy * c, const int32_t * ids, int32_t n_ids,
                                struct pymoe_cache_upload * uploads, struct pymoe_cache_result * out) {
    memset(out, 0, sizeof(*out));
    c->clock++;
    advance(c);
    /* hits and misses against what the cache held while the decode ran */
    int32_t n_missed = 0;
    for (int32_t i = 0; i < n_ids; i++) {
        const int32_t e = ids[i];
        if (e < 0 || e >= c->n_experts) {
            out->misses++;
            continue;
        }
        c->score[e] += c->unit;
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
    /* copy in the missed experts, the highest scores first (ties: the first seen), while they beat what they evict */
    int32_t       n_up = 0;
    const int32_t cap  = c->upload_cap > 0 ? c->upload_cap : n_missed;
    while (n_up < cap && n_up < n_missed) {
        int32_t best = n_up;
        for (int32_t j = n_up + 1; j < n_missed; j++) {
            if (c->score[c->missed[j]] > c->score[c->missed[best]]) {
                best = j;
            }
        }
        const int32_t e = c->missed[best];
        c->missed[best] = c->missed[n_up];
        c->missed[n_up] = e;
        const int32_t slot = victim(c);
        if (slot < 0 || (c->expert_in[slot] >= 0 && c->score[c->expert_in[slot]] >= c->score[e])) {
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

int32_t pymoe_moe_cache_replay(int32_t n_experts, int32_t n_used, int32_t n_slots, int32_t upload_cap, double decay,
                               const int32_t * ids, const int32_t * step_tokens, int32_t n_steps,
                               struct pymoe_moe_cache_stats * out) {
    if (!out || n_steps < 0 || (n_steps > 0 && (!ids || !step_tokens))) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: NULL argument");
    }
    if (n_experts <= 0 || n_used <= 0 || n_slots <= 0 || upload_cap < 0 || !(decay >= 0.0 && decay < 1.0)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: need n_experts, n_used and n_slots > 0, "
                          "upload_cap >= 0 and decay in [0, 1) (got %d, %d, %d, %d, %g)", n_experts, n_used, n_slots,
                          upload_cap, decay);
    }
    for (int32_t i = 0; i < n_steps; i++) {
        if (step_tokens[i] <= 0) {
            return pymoe_fail(PYMOE_EINVAL, "pymoe_moe_cache_replay: step %d has %d tokens", i, step_tokens[i]);
        }
    }
    struct pymoe_cache_policy c;
    struct pymoe_cache_upload * up = malloc(sizeof(*up) * (size_t) n_experts);
    if (!up || !pymoe_cache_policy_init(&c, n_experts, n_slots < n_experts ? n_slots : n_experts, upload_cap, decay)) {
        free(up);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    const int32_t * at = ids;
    for (int32_t i = 0; i < n_steps; i++) {
        struct pymoe_cache_result r;
        const int32_t             n = step_tokens[i] * n_used;
        pymoe_cache_policy_step(&c, at, n, up, &r);
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
    pymoe_cache_policy_free(&c);
    free(up);
    return pymoe_ok();
}
