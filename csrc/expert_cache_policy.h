/* expert_cache_policy.h - one layer's expert cache as a pure rule (no ggml). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define PYMOE_CACHE_DECAY 0.98  /* per decode; replayed against others in bench/results/expert_cache.md */

struct pymoe_cache_policy {
    int32_t    n_experts, n_slots;
    int32_t    upload_cap;  /* experts copied in per decode; 0 = no limit */
    double     decay;       /* what a use still counts for one decode later, in (0, 1) */
    double     unit;        /* what one use adds now: 1 / decay^decodes, so that old scores need no update */
    double *   score;       /* [n_experts] decayed uses, in units */
    int32_t *  slot_of;     /* [n_experts] the slot holding the expert, -1: not held */
    int32_t *  expert_in;   /* [n_slots] the expert in the slot, -1: free */
    uint64_t * last_used;   /* [n_slots] the decode that last used the slot */
    uint64_t   clock;       /* decodes so far */
    int32_t *  count;       /* [n_experts] scratch: uses in this decode */
    int32_t *  missed;      /* [n_experts] scratch: the distinct misses of this decode */
};

struct pymoe_cache_upload {
    int32_t expert, slot;
};

struct pymoe_cache_result {
    int32_t hits, misses;     /* expert uses (token x expert) held / not held while the decode ran */
    int32_t distinct;         /* distinct experts the decode used (valid ids) */
    int32_t distinct_missed;  /* ... of them not held: read from host memory */
    int32_t uploads;          /* experts copied in after it */
};

/* decay: in (0, 1); 0 = PYMOE_CACHE_DECAY. */
bool pymoe_cache_policy_init(struct pymoe_cache_policy * c, int32_t n_experts, int32_t n_slots, int32_t upload_cap,
                             double decay);
void pymoe_cache_policy_free(struct pymoe_cache_policy * c);
/* One decode's routed ids (n_ids = tokens x experts per token): counts it
 * against what the cache held, then chooses what to copy in; uploads needs
 * room for n_experts entries. Returns the number of uploads. */
int32_t pymoe_cache_policy_step(struct pymoe_cache_policy * c, const int32_t * ids, int32_t n_ids,
                                struct pymoe_cache_upload * uploads, struct pymoe_cache_result * out);
