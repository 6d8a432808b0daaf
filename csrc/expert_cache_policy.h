/* expert_cache_policy.h - one layer's expert cache as a pure rule (no ggml). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

struct pymoe_lru {
    int32_t    n_experts, n_slots;
    int32_t    upload_cap;  /* experts copied in per decode; 0 = no limit */
    int32_t *  slot_of;     /* [n_experts] the slot holding the expert, -1: not held */
    int32_t *  expert_in;   /* [n_slots] the expert in the slot, -1: free */
    uint64_t * last_used;   /* [n_slots] the decode that last used the slot */
    uint64_t   clock;       /* decodes so far */
    int32_t *  count;       /* [n_experts] scratch: uses in this decode */
    int32_t *  missed;      /* [n_experts] scratch: the distinct misses of this decode */
};

struct pymoe_lru_upload {
    int32_t expert, slot;
};

struct pymoe_lru_result {
    int32_t hits, misses;     /* expert uses (token x expert) held / not held while the decode ran */
    int32_t distinct;         /* distinct experts the decode used (valid ids) */
    int32_t distinct_missed;  /* ... of them not held: read from host memory */
    int32_t uploads;          /* experts copied in after it */
};

bool pymoe_lru_init(struct pymoe_lru * c, int32_t n_experts, int32_t n_slots, int32_t upload_cap);
void pymoe_lru_free(struct pymoe_lru * c);
/* One decode's routed ids (n_ids = tokens x experts per token): counts it
 * against what the cache held, then chooses what to copy in; uploads needs
 * room for n_ids entries. Returns the number of uploads. */
int32_t pymoe_lru_step(struct pymoe_lru * c, const int32_t * ids, int32_t n_ids, struct pymoe_lru_upload * uploads,
                       struct pymoe_lru_result * out);
