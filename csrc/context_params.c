/* context_params.c - a session's params as llama.cpp's context params,
 * checked and translated; the KV cache types a session takes (and the one
 * KV-size rule); the CPU topology behind the default thread count. */
#define _GNU_SOURCE /* sched_getaffinity */
#include "internal.h"

#include <ctype.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

PYMOE_PARAMS_END_AT(struct pymoe_session_params, abort_user_data);

static const struct pymoe_session_params DEFAULTS = {
    .size = sizeof(struct pymoe_session_params), .n_ctx = 4096, .n_batch = 512, .n_ubatch = 512,
    .flash_attn = PYMOE_FLASH_ATTN_AUTO,
};

void pymoe_session_params_init(struct pymoe_session_params * params, size_t size) {
    pymoe_struct_init(params, &DEFAULTS, sizeof(DEFAULTS), size);
}

int32_t pymoe_session_params_in(const struct pymoe_session_params * params, struct pymoe_session_params * local) {
    *local = DEFAULTS;
    return pymoe_struct_in(params, local, sizeof(*local),
                           PYMOE_PARAMS_V1(struct pymoe_session_params, abort_user_data), "pymoe_session_params");
}

/* The types llama.cpp's attention kernels take for a KV cache, by ggml name
 * (other ggml types, e.g. i32, crash at the first decode). */
static const char CACHE_TYPES[] = "f16,f32,bf16,q8_0,q4_0,q4_1,iq4_nl,q5_0,q5_1";

const char * pymoe_cache_types(void) { return CACHE_TYPES; }

static bool is_cache_type(const char * name) {
    size_t n = strlen(name);
    for (const char * at = CACHE_TYPES; n > 0 && (at = strstr(at, name)) != NULL; at += n) {
        if ((at == CACHE_TYPES || at[-1] == ',') && (at[n] == ',' || at[n] == '\0')) {
            return true;
        }
    }
    return false;
}

static int32_t parse_cache_type(const char * name, enum ggml_type * out) {
    if (!name) {
        *out = GGML_TYPE_F16;
        return PYMOE_OK;
    }
    char lower[16] = "";
    for (size_t i = 0; name[i] && i + 1 < sizeof(lower); i++) {
        lower[i]     = (char) tolower((unsigned char) name[i]);
        lower[i + 1] = '\0';
    }
    for (int t = 0; strlen(name) < sizeof(lower) && is_cache_type(lower) && t < GGML_TYPE_COUNT; t++) {
        const char * tn = ggml_type_name((enum ggml_type) t);
        if (tn && strcmp(tn, lower) == 0) {
            *out = (enum ggml_type) t;
            return PYMOE_OK;
        }
    }
    return pymoe_fail(PYMOE_EINVAL, "unknown KV cache type '%s' (one of %s)", name, CACHE_TYPES);
}

int32_t pymoe_kv_cache_bytes(uint64_t k_elements, uint64_t v_elements, uint32_t n_ctx, const char * type_k,
                             const char * type_v, uint64_t * out) {
    enum ggml_type tk = GGML_TYPE_F16, tv = GGML_TYPE_F16;
    int32_t        rc = out ? parse_cache_type(type_k, &tk) : pymoe_fail(PYMOE_EINVAL, "pymoe_kv_cache_bytes: out is NULL");
    rc                = rc == PYMOE_OK ? parse_cache_type(type_v, &tv) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    double per_token = (double) k_elements * ggml_type_size(tk) / ggml_blck_size(tk) +
                       (double) v_elements * ggml_type_size(tv) / ggml_blck_size(tv);
    *out = (uint64_t) (per_token * n_ctx);
    return pymoe_ok();
}

/* Physical cores this process may run on, as llama.cpp's tools count them:
 * one per distinct set of thread siblings (SMT siblings share a core's math
 * units, and a second thread on them slows a decode down). Online CPUs when
 * the topology cannot be read. */
static int32_t default_threads(void) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) {
        CPU_ZERO(&allowed);
    }
    char    seen[64][128];
    int32_t n_seen = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n_seen < 64; cpu++) {
        if (!CPU_ISSET(cpu, &allowed)) {
            continue;
        }
        char path[96], siblings[128] = "";
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/thread_siblings", cpu);
        FILE * f  = fopen(path, "r");
        bool   ok = f && fgets(siblings, sizeof(siblings), f);
        if (f) {
            fclose(f);
        }
        if (!ok) {  /* no topology: count online CPUs */
            n_seen = 0;
            break;
        }
        bool known = false;
        for (int32_t i = 0; i < n_seen && !known; i++) {
            known = strcmp(seen[i], siblings) == 0;
        }
        if (!known) {
            snprintf(seen[n_seen++], sizeof(seen[0]), "%s", siblings);
        }
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return n_seen > 0 ? n_seen : online > 0 ? (int32_t) online : 1;
}

int32_t pymoe_context_params(const pymoe_model * model, const struct pymoe_session_params * params,
                             struct llama_context_params * out) {
    /* checked first: nothing is created for params that cannot work */
    uint32_t n_ctx = params->n_ctx ? params->n_ctx : (uint32_t) model->info.n_ctx_train;
    if (n_ctx > INT32_MAX / 2) {
        return pymoe_fail(PYMOE_EINVAL, "context size %u is too large", n_ctx);
    }
    if (params->n_batch == 0 || params->n_ubatch == 0 || params->n_ubatch > params->n_batch) {
        return pymoe_fail(PYMOE_EINVAL, "need 0 < n_ubatch <= n_batch (got n_batch %u, n_ubatch %u)",
                          params->n_batch, params->n_ubatch);
    }
    if (params->n_threads < 0 || params->n_threads_batch < 0 || params->n_threads > GGML_MAX_N_THREADS ||
        params->n_threads_batch > GGML_MAX_N_THREADS) {
        return pymoe_fail(PYMOE_EINVAL, "thread counts must be in [0, %d] (0 = one per physical core), got %d and %d",
                          GGML_MAX_N_THREADS, params->n_threads, params->n_threads_batch);
    }
    if (params->flash_attn < PYMOE_FLASH_ATTN_AUTO || params->flash_attn > PYMOE_FLASH_ATTN_ON) {
        return pymoe_fail(PYMOE_EINVAL, "flash_attn must be -1 (auto), 0 (off) or 1 (on), got %d", params->flash_attn);
    }
    enum ggml_type tk = GGML_TYPE_F16, tv = GGML_TYPE_F16;
    int32_t        rc = parse_cache_type(params->cache_type_k, &tk);
    if (rc == PYMOE_OK) {
        rc = parse_cache_type(params->cache_type_v, &tv);
    }
    if (rc != PYMOE_OK) {
        return rc;
    }
    const struct pymoe_model_info * info = &model->info;
    int32_t head = info->n_head > 0 ? info->n_embd / info->n_head : info->n_embd;
    int32_t dk   = pymoe_meta_int(model, "attention.key_length", head);
    int32_t dv   = pymoe_meta_int(model, "attention.value_length", head);
    if (dk % ggml_blck_size(tk) != 0 || dv % ggml_blck_size(tv) != 0) {
        return pymoe_fail(PYMOE_EINVAL,
                          "KV cache types %s/%s store blocks of %lld/%lld values, which do not divide this model's "
                          "head sizes %d/%d; use f16, bf16 or f32",
                          ggml_type_name(tk), ggml_type_name(tv), (long long) ggml_blck_size(tk),
                          (long long) ggml_blck_size(tv), dk, dv);
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_ctx;
    cp.n_batch         = params->n_batch;
    cp.n_ubatch        = params->n_ubatch;
    cp.n_seq_max       = 1;
    cp.n_threads       = params->n_threads ? params->n_threads : default_threads();
    cp.n_threads_batch = params->n_threads_batch ? params->n_threads_batch : cp.n_threads;
    cp.flash_attn_type = (enum llama_flash_attn_type) params->flash_attn;
    cp.type_k          = tk;
    cp.type_v          = tv;
    cp.no_perf         = true;
    cp.n_rs_seq        = params->n_rs_seq;
    *out = cp;
    return PYMOE_OK;
}
