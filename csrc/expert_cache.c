/* expert_cache.c - recently used experts of host-resident MoE layers kept in
 * device memory. Per cached layer: each expert tensor gets a device copy with
 * n_slots + 1 experts (the last one all zeros), and two I32 tables say, per
 * expert, its slot (the zero slot when not held) and its index in host memory
 * (-1 when held). pymoe's llama.cpp patch (docs/llama_patches.md) computes a
 * small batch's experts as device part + host part, each row on exactly one
 * side, so the output is what the uncached graph gives. The tables only change
 * between decodes: the experts a decode missed are copied in after it, as the
 * policy in expert_cache_policy.c chooses, so a miss never waits for a copy. */
#include "expert_cache_policy.h"
#include "internal.h"

#include "draft_length.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_EXPERT_TENSORS = 4 };  /* up, gate, down, or a merged gate_up */
static const char * const EXPERT_TENSORS[MAX_EXPERT_TENSORS] = { "ffn_up_exps", "ffn_gate_exps", "ffn_down_exps",
                                                                 "ffn_gate_up_exps" };

struct cached_layer {
    int32_t              n_w;
    struct ggml_tensor * host[MAX_EXPERT_TENSORS];  /* the model's expert tensors, in host memory */
    struct ggml_tensor * dev[MAX_EXPERT_TENSORS];   /* their caches: [ne0, ne1, n_slots + 1] on the device */
    uint64_t             expert_bytes;              /* one expert of every tensor */
    struct ggml_tensor * slot_of;                   /* I32 [1, n_experts] on the device */
    struct ggml_tensor * host_of;                   /* I32 [1, n_experts] on the device */
    int32_t *            slot_table;                /* the host side's copy of both tables */
    int32_t *            host_table;
    struct pymoe_cache_policy policy;
    int32_t              buf;                       /* which of the cache's buffers */
};

struct pymoe_expert_cache {
    int32_t                       n_layers;   /* layers of the model, an MTP head's included */
    int32_t                       n_experts, n_used;
    struct cached_layer **        layers;     /* [n_layers]; NULL: not cached */
    struct ggml_context *         ctx[PYMOE_MAX_DEVICES];
    ggml_backend_buffer_type_t    buft[PYMOE_MAX_DEVICES];
    ggml_backend_buffer_t         buf[PYMOE_MAX_DEVICES];
    int32_t                       n_buf;
    struct pymoe_cache_upload *   uploads;    /* scratch: one decode's uploads of a layer */
    pthread_mutex_t               lock;       /* one decode at a time over the tables and slots */
    struct pymoe_moe_cache_info   info;
};

struct pymoe_eval_watch {
    struct pymoe_routing *             user;        /* record_routing's recorder (NULL: none) */
    struct pymoe_routing *             cache;       /* the cache's: what the current decode routed */
    const struct pymoe_expert_cache *  of;          /* whose layers it watches */
    int32_t                            max_tokens;
};

static struct ggml_tensor * layer_tensor_part(const struct llama_model * lm, int32_t il, const char * name,
                                              const char * part) {
    char full[96];
    snprintf(full, sizeof(full), "blk.%d.%s.%s", il, name, part);
    return pymoe_llama_tensor(lm, full);
}

static struct ggml_tensor * layer_tensor(const struct llama_model * lm, int32_t il, const char * name) {
    return layer_tensor_part(lm, il, name, "weight");
}

/* The device buffer type a layer's cache goes to: its router's, when the
 * router is on a device and the experts are all in host buffers (plain CPU,
 * or a GPU build's pinned CUDA_Host: laid out as their type says; llama.cpp's
 * repacked layouts are off with a cache, llama_params.c). NULL otherwise, with
 * *uncacheable set when experts in host memory are left out. */
static ggml_backend_buffer_type_t layer_device(const struct llama_model * lm, int32_t il, int64_t n_experts,
                                               struct cached_layer * out, bool * uncacheable) {
    const struct ggml_tensor * router = layer_tensor(lm, il, "ffn_gate_inp");
    bool                       on_device = false, odd = false;
    memset(out, 0, sizeof(*out));
    for (int32_t k = 0; k < MAX_EXPERT_TENSORS; k++) {
        struct ggml_tensor * w = layer_tensor(lm, il, EXPERT_TENSORS[k]);
        if (!w) {
            continue;
        }
        if (!w->buffer || !ggml_backend_buffer_is_host(w->buffer)) {
            on_device = true;
        } else if (ggml_n_dims(w) != 3 || w->ne[2] != n_experts ||
                   layer_tensor_part(lm, il, EXPERT_TENSORS[k], "bias") ||
                   layer_tensor_part(lm, il, EXPERT_TENSORS[k], "scale")) {
            odd = true;  /* the patch serves expert matmuls without per-expert biases or scales */
        } else {
            out->host[out->n_w++] = w;
            out->expert_bytes += w->nb[2];
        }
    }
    /* experts in host memory, but only some, with biases or scales, or with the router there too: not served */
    const bool in_host = out->n_w > 0 || odd;
    *uncacheable       = in_host && (on_device || odd || !router || !router->buffer ||
                                     ggml_backend_buffer_is_host(router->buffer));
    return out->n_w > 0 && !*uncacheable ? ggml_backend_buffer_get_type(router->buffer) : NULL;
}

static void free_layers(struct pymoe_expert_cache * c) {
    for (int32_t il = 0; il < c->n_layers && c->layers; il++) {
        struct cached_layer * l = c->layers[il];
        if (!l) {
            continue;
        }
        for (int32_t k = 0; k < l->n_w; k++) {
            pymoe_llama_expert_cache(l->host[k], NULL, NULL, NULL, 0);
        }
        pymoe_cache_policy_free(&l->policy);
        free(l->slot_table);
        free(l->host_table);
        free(l);
    }
    free(c->layers);
    c->layers = NULL;
}

void pymoe_expert_cache_free(struct pymoe_expert_cache * c) {
    if (!c) {
        return;
    }
    free_layers(c);  /* no graph refers to the device copies any longer */
    for (int32_t i = 0; i < c->n_buf; i++) {
        ggml_backend_buffer_free(c->buf[i]);
        ggml_free(c->ctx[i]);
    }
    free(c->uploads);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

static int32_t buffer_of(struct pymoe_expert_cache * c, ggml_backend_buffer_type_t buft, size_t n_tensors) {
    for (int32_t i = 0; i < c->n_buf; i++) {
        if (c->buft[i] == buft) {
            return i;
        }
    }
    struct ggml_init_params ip = { ggml_tensor_overhead() * n_tensors, NULL, true };
    c->ctx[c->n_buf]           = ggml_init(ip);
    c->buft[c->n_buf]          = buft;
    return c->ctx[c->n_buf] ? c->n_buf++ : -1;
}

static void upload_tables(const struct cached_layer * l, int32_t n_experts) {
    ggml_backend_tensor_set(l->slot_of, l->slot_table, 0, sizeof(int32_t) * (size_t) n_experts);
    ggml_backend_tensor_set(l->host_of, l->host_table, 0, sizeof(int32_t) * (size_t) n_experts);
}

/* The largest batch the cache may serve: below the batch from which ggml's
 * device backends copy host weights to the device for an op
 * (GGML_OP_OFFLOAD_MIN_BATCH, 32 by default; 0 or less, or not a number: every
 * batch), where the host part would run on the device, which does not skip
 * the rows the device part computed. 0: none. */
static int32_t max_tokens(void) {
    const char * env = getenv("GGML_OP_OFFLOAD_MIN_BATCH");
    if (!env) {
        return PYMOE_SPEC_MAX_BATCH;
    }
    const long min = strtol(env, NULL, 10);
    return min <= 1 ? 0 : min <= PYMOE_SPEC_MAX_BATCH ? (int32_t) min - 1 : PYMOE_SPEC_MAX_BATCH;
}

/* Layers, slots and device tensors for a budget; the caller allocates. */
static int32_t plan(struct pymoe_expert_cache * c, const struct llama_model * lm, uint64_t budget,
                    int32_t upload_cap) {
    struct pymoe_moe_cache_info * info = &c->info;
    uint64_t                      slot_bytes = 0;
    c->layers = calloc((size_t) c->n_layers, sizeof(*c->layers));
    if (!c->layers) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t skipped = 0;
    for (int32_t il = 0; il < c->n_layers; il++) {
        struct cached_layer        l;
        bool                       uncacheable;
        ggml_backend_buffer_type_t buft = layer_device(lm, il, c->n_experts, &l, &uncacheable);
        if (!buft) {  /* a dense layer, experts on the device already, or not servable */
            skipped += uncacheable;
            continue;
        }
        c->layers[il] = malloc(sizeof(l));
        if (!c->layers[il]) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        *c->layers[il] = l;
        c->layers[il]->buf = buffer_of(c, buft, (size_t) c->n_layers * (MAX_EXPERT_TENSORS + 2) + 1);
        if (c->layers[il]->buf < 0) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        slot_bytes += l.expert_bytes;
        info->n_layers++;
    }
    if (skipped > 0) {
        snprintf(info->note, sizeof(info->note), "%d MoE layer(s) with experts in host memory not cached: their "
                 "router is in host memory too, only some of their expert tensors are, or their experts have "
                 "biases or scales", skipped);
    }
    if (info->n_layers == 0) {
        return PYMOE_OK;
    }
    const uint64_t tables = (uint64_t) info->n_layers * 2 * (uint64_t) c->n_experts * sizeof(int32_t);
    const int64_t  slots  = budget > tables ? (int64_t) ((budget - tables) / slot_bytes) - 1 : -1;
    if (slots < 1) {
        return pymoe_fail(PYMOE_EINVAL, "an expert cache of %.1f MiB cannot hold one expert per layer: one needs "
                          "%.1f MiB (%d layers x %.2f MiB, and as much again for the zero slot each layer keeps); "
                          "give it more (--moe-cache-mib) or none", (double) budget / 1048576.0,
                          (double) (2 * slot_bytes + tables) / 1048576.0, info->n_layers,
                          (double) slot_bytes / info->n_layers / 1048576.0);
    }
    info->n_slots    = slots < c->n_experts ? (int32_t) slots : c->n_experts;
    info->upload_cap = upload_cap;
    info->max_tokens = max_tokens();
    if (info->max_tokens < 1) {
        return pymoe_fail(PYMOE_EINVAL, "GGML_OP_OFFLOAD_MIN_BATCH=%s copies every batch's experts to the device: "
                          "an expert cache has nothing to serve; unset it or use no cache",
                          getenv("GGML_OP_OFFLOAD_MIN_BATCH"));
    }
    info->slot_bytes = slot_bytes;
    for (int32_t il = 0; il < c->n_layers; il++) {
        struct cached_layer * l = c->layers[il];
        if (!l) {
            continue;
        }
        struct ggml_context * ctx = c->ctx[l->buf];
        for (int32_t k = 0; k < l->n_w; k++) {
            const struct ggml_tensor * w = l->host[k];
            l->dev[k] = ggml_new_tensor_3d(ctx, w->type, w->ne[0], w->ne[1], info->n_slots + 1);
            ggml_format_name(l->dev[k], "moe_cache.%d.%d", il, k);
        }
        l->slot_of    = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, c->n_experts);
        l->host_of    = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, c->n_experts);
        l->slot_table = malloc(sizeof(int32_t) * (size_t) c->n_experts);
        l->host_table = malloc(sizeof(int32_t) * (size_t) c->n_experts);
        if (!l->slot_table || !l->host_table || !pymoe_cache_policy_init(&l->policy, c->n_experts, info->n_slots, upload_cap, 0.0)) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        for (int32_t e = 0; e < c->n_experts; e++) {
            l->slot_table[e] = info->n_slots;  /* the zero slot: nothing held yet */
            l->host_table[e] = e;
        }
    }
    return PYMOE_OK;
}

int32_t pymoe_expert_cache_create(pymoe_model * m, int32_t mib, int32_t upload_cap) {
    struct pymoe_moe_cache_info * info = &m->cache_info;
    memset(info, 0, sizeof(*info));
    if (mib < 0 || upload_cap < 0) {
        return pymoe_fail(PYMOE_EINVAL, "moe_cache_mib and moe_cache_uploads must be >= 0 (got %d, %d)", mib,
                          upload_cap);
    }
    if (mib == 0) {
        return PYMOE_OK;
    }
    if (m->info.n_experts <= 0) {
        snprintf(info->note, sizeof(info->note), "no expert cache: %s model without routed experts", m->info.arch);
        return PYMOE_OK;
    }
    if (strcmp(m->info.arch, "llama4") == 0) {  /* it weighs the input before the experts: not what the patch serves */
        snprintf(info->note, sizeof(info->note), "no expert cache: llama4 models are not served by it");
        return PYMOE_OK;
    }
    if (!pymoe_llama_has_expert_cache()) {
        snprintf(info->note, sizeof(info->note), "no expert cache: this build's llama.cpp lacks pymoe's patch "
                 "(patches/)");
        return PYMOE_OK;
    }
    struct pymoe_expert_cache * c = calloc(1, sizeof(*c));
    if (!c) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&c->lock, NULL);
    c->n_layers  = m->info.n_layers + m->info.n_nextn_layers;
    c->n_experts = m->info.n_experts;
    c->n_used    = m->info.n_experts_used;
    int32_t rc   = plan(c, m->llama, (uint64_t) mib * 1048576u, upload_cap);
    if (rc == PYMOE_OK && c->info.n_layers == 0) {
        if (c->info.note[0]) {
            snprintf(info->note, sizeof(info->note), "no expert cache: %.200s", c->info.note);
        } else {
            snprintf(info->note, sizeof(info->note), "no expert cache: no MoE layer keeps its experts in host "
                     "memory while its router is on a device (nothing to cache; see n_cpu_moe)");
        }
        pymoe_expert_cache_free(c);
        return PYMOE_OK;
    }
    for (int32_t i = 0; rc == PYMOE_OK && i < c->n_buf; i++) {
        c->buf[i] = ggml_backend_alloc_ctx_tensors_from_buft(c->ctx[i], c->buft[i]);
        if (!c->buf[i]) {
            rc = pymoe_fail(PYMOE_ENOMEM, "%s could not allocate the expert cache's %d MiB",
                            ggml_backend_buft_name(c->buft[i]), mib);
        } else {
            /* weights: ggml's scheduler runs an op where its weights are; as a plain buffer, the cache
             * would be copied to wherever the activations are, every decode */
            ggml_backend_buffer_set_usage(c->buf[i], GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            ggml_backend_buffer_clear(c->buf[i], 0);  /* the zero slots */
            c->info.bytes += ggml_backend_buffer_get_size(c->buf[i]);
        }
    }
    c->uploads = rc == PYMOE_OK ? malloc(sizeof(*c->uploads) * (size_t) c->n_experts) : NULL;
    if (rc == PYMOE_OK && !c->uploads) {
        rc = pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    if (rc != PYMOE_OK) {
        pymoe_expert_cache_free(c);
        return rc;
    }
    for (int32_t il = 0; il < c->n_layers; il++) {
        struct cached_layer * l = c->layers[il];
        if (l) {
            upload_tables(l, c->n_experts);
            for (int32_t k = 0; k < l->n_w; k++) {
                pymoe_llama_expert_cache(l->host[k], l->dev[k], l->slot_of, l->host_of, c->info.max_tokens);
            }
        }
    }
    c->info.enabled = true;
    *info           = c->info;
    m->cache        = c;
    return PYMOE_OK;
}

int32_t pymoe_model_moe_cache(const pymoe_model * model, struct pymoe_moe_cache_info * out) {
    if (!model || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_moe_cache: NULL argument");
    }
    *out = model->cache_info;
    return pymoe_ok();
}

/* ---- decodes ------------------------------------------------------------- */

static bool watch_eval(struct ggml_tensor * t, bool ask, void * data) {
    struct pymoe_eval_watch * w    = data;
    bool                      want = false;
    if (w->user) {
        want = pymoe_routing_eval(t, ask, w->user) || want;
    }
    /* a cached layer's router, in a graph small enough to read the cache (every stop costs a sync) */
    if (w->cache && t->ne[1] <= w->max_tokens) {
        const int32_t il = pymoe_routing_layer(t);
        if (il >= 0 && il < w->of->n_layers && w->of->layers[il]) {
            want = pymoe_routing_eval(t, ask, w->cache) || want;
        }
    }
    return ask ? want : true;
}

int32_t pymoe_eval_watch_new(const pymoe_model * m, struct pymoe_routing * user, struct llama_context_params * cp,
                             struct pymoe_eval_watch ** out) {
    *out = NULL;
    if (!m->cache && !user) {
        return PYMOE_OK;
    }
    struct pymoe_eval_watch * w = calloc(1, sizeof(*w));
    if (!w) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    w->user = user;
    if (m->cache) {
        w->cache      = pymoe_routing_new(m->cache->n_layers);
        w->of         = m->cache;
        w->max_tokens = m->cache->info.max_tokens;
        if (!w->cache) {
            free(w);
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
    }
    cp->cb_eval           = watch_eval;
    cp->cb_eval_user_data = w;
    *out                  = w;
    return PYMOE_OK;
}

void pymoe_eval_watch_free(struct pymoe_eval_watch * w) {
    if (w) {
        pymoe_routing_free(w->cache);  /* the user's recorder is the session's */
        free(w);
    }
}

void pymoe_expert_cache_begin(struct pymoe_expert_cache * c, struct pymoe_eval_watch * w) {
    if (c) {
        pthread_mutex_lock(&c->lock);
        pymoe_routing_clear(w ? w->cache : NULL);
    }
}

/* Count one layer's decode and copy in what the policy chooses. */
static void update_layer(struct pymoe_expert_cache * c, struct cached_layer * l, const int32_t * ids, int32_t n_ids,
                         struct pymoe_moe_cache_stats * st) {
    struct pymoe_cache_result r;
    const int32_t             n_up    = pymoe_cache_policy_step(&l->policy, ids, n_ids, c->uploads, &r);
    const int32_t             n_slots = c->info.n_slots;
    const double              t0      = n_up > 0 ? pymoe_now() : 0.0;
    for (int32_t i = 0; i < n_up; i++) {
        const struct pymoe_cache_upload * u = &c->uploads[i];
        for (int32_t k = 0; k < l->n_w; k++) {
            const size_t nb = l->host[k]->nb[2];
            ggml_backend_tensor_set(l->dev[k], (const char *) l->host[k]->data + nb * (size_t) u->expert,
                                    nb * (size_t) u->slot, nb);
        }
    }
    if (n_up > 0) {
        for (int32_t e = 0; e < c->n_experts; e++) {
            l->slot_table[e] = l->policy.slot_of[e] >= 0 ? l->policy.slot_of[e] : n_slots;
            l->host_table[e] = l->policy.slot_of[e] >= 0 ? -1 : e;
        }
        upload_tables(l, c->n_experts);
        st->upload_seconds += pymoe_now() - t0;
    }
    st->hits += (uint64_t) r.hits;
    st->misses += (uint64_t) r.misses;
    st->uploads += (uint64_t) n_up;
    st->uploaded_bytes += (uint64_t) n_up * l->expert_bytes;
    st->host_experts += (uint64_t) r.distinct_missed;
    st->host_expert_bytes += (uint64_t) r.distinct_missed * l->expert_bytes;
    st->uncached_expert_bytes += (uint64_t) r.distinct * l->expert_bytes;
}

void pymoe_expert_cache_end(struct pymoe_expert_cache * c, struct llama_context * ctx, struct pymoe_eval_watch * w,
                            bool decoded, struct pymoe_moe_cache_stats * st) {
    if (!c) {
        return;
    }
    /* whatever the decode's size, its last ubatch may have been small enough to read the cache: nothing may
     * change the slots and tables, nor another session take the cache, before the device is done with them */
    llama_synchronize(ctx);
    int32_t tokens = 0;  /* the rows of the recorded (small) ubatches: the first cached layer's */
    for (int32_t il = 0; decoded && w && il < c->n_layers; il++) {
        const int32_t * ids;
        int32_t         used = 0, n = 0;
        /* n is the layer's rows: the last layer computes only the rows whose logits are asked for */
        if (c->layers[il] && pymoe_routing_get(w->cache, il, &ids, &used, &n) && used == c->n_used) {
            update_layer(c, c->layers[il], ids, n * used, st);
            tokens = tokens ? tokens : n;
        }
    }
    if (tokens) {
        st->steps++;
        st->tokens += (uint64_t) tokens;
    }
    pymoe_routing_clear(w ? w->cache : NULL);
    pthread_mutex_unlock(&c->lock);
}

int32_t pymoe_session_moe_cache_stats(const pymoe_session * s, struct pymoe_moe_cache_stats * out) {
    if (!s || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_moe_cache_stats: NULL argument");
    }
    if (!s->model->cache) {
        return pymoe_fail(PYMOE_ESTATE, "this session's model has no expert cache (moe_cache_mib)");
    }
    *out = s->cache_stats;
    return pymoe_ok();
}
