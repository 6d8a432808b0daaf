/* session.c - one llama.cpp context: feed tokens, read logits, rewind, save state. */
#define _GNU_SOURCE /* sched_getaffinity */
#include "internal.h"

#include <ctype.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

void pymoe_session_params_default(struct pymoe_session_params * params) {
    if (!params) {
        return;
    }
    memset(params, 0, sizeof(*params));
    params->n_ctx      = 4096;
    params->n_batch    = 512;
    params->n_ubatch   = 512;
    params->flash_attn = PYMOE_FLASH_ATTN_AUTO;
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

/* llama.cpp's abort callback (between graph nodes): an interrupt since the feed began, or the caller's request. */
static bool should_abort(void * data) {
    const pymoe_session * s = data;
    return pymoe_interrupt_count() != s->interrupts || (s->abort && s->abort(s->abort_user_data));
}

int32_t pymoe_session_create(pymoe_model * model, const struct pymoe_session_params * params, pymoe_session ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_create: out is NULL");
    }
    *out = NULL;
    if (!model || !params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_create: model and params are required");
    }
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
    bool on_gpu = llama_supports_gpu_offload() && ggml_backend_dev_count() > 1;
    if (!on_gpu) {
        uint64_t need  = 0;
        uint64_t avail = pymoe_mem_available();
        pymoe_kv_cache_bytes(model->kv_elements[0], model->kv_elements[1], n_ctx, params->cache_type_k,
                             params->cache_type_v, &need);
        if (avail > 0 && need > avail) {
            return pymoe_fail(PYMOE_ENOMEM,
                              "a context of %u tokens needs about %.1f MiB of KV cache, but only %.1f MiB of memory "
                              "is available; use a smaller context (n_ctx) or a quantized cache type",
                              n_ctx, (double) need / 1048576.0, (double) avail / 1048576.0);
        }
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
    struct pymoe_routing * routing = NULL;
    if (params->record_routing) {
        routing = pymoe_routing_new(model->info.n_layers);
        if (!routing) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
    }
    struct pymoe_eval_watch * watch = NULL;
    int32_t                   wrc   = pymoe_eval_watch_new(model, routing, &cp, &watch);
    if (wrc != PYMOE_OK) {
        pymoe_routing_free(routing);
        return wrc;
    }

    pymoe_llama_clear_error();
    struct llama_context * ctx = pymoe_guarded_init_context(model->llama, cp);
    if (!ctx) {
        pymoe_eval_watch_free(watch);
        pymoe_routing_free(routing);
        const char * why = pymoe_llama_last_error();
        int32_t      status = strstr(why, "alloc") ? PYMOE_ENOMEM : PYMOE_EBACKEND;
        return pymoe_fail(status, "could not create a context of %u tokens: %s", n_ctx, why[0] ? why : "(no message)");
    }
    struct pymoe_session * s = calloc(1, sizeof(*s));
    int32_t                n_vocab = model->info.n_vocab;
    if (s) {
        s->scratch = malloc(PYMOE_SAMPLING_SCRATCH(n_vocab));
    }
    if (!s || !s->scratch) {
        free(s);
        llama_free(ctx);
        pymoe_eval_watch_free(watch);
        pymoe_routing_free(routing);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    s->model   = model;
    s->ctx     = ctx;
    s->cparams = cp;
    s->mem     = llama_get_memory(ctx);
    s->n_batch = (int32_t) llama_n_batch(ctx);
    s->n_ctx   = (int32_t) llama_n_ctx(ctx);
    s->n_vocab = n_vocab;
    s->batch   = llama_batch_init(s->n_batch, 0, 1);
    s->recurrent = model->info.is_recurrent || model->info.is_hybrid;
    s->n_rs_seq  = (int32_t) llama_n_rs_seq(ctx);
    s->ckpt_pos  = -1;
    s->routing   = routing;
    s->watch     = watch;
    s->abort           = params->abort;
    s->abort_user_data = params->abort_user_data;
    llama_set_abort_callback(ctx, should_abort, s);
    if (params->n_rs_seq > 0 && s->recurrent && s->n_rs_seq == 0) {
        pymoe_log(PYMOE_LOG_WARN, "llama.cpp keeps no recurrent-state snapshots for %s models (asked for %u): "
                  "rewinding needs checkpoints", model->info.arch, params->n_rs_seq);
    }
    if (s->n_ctx > model->info.n_ctx_train && model->info.n_ctx_train > 0) {
        pymoe_log(PYMOE_LOG_WARN, "context of %d tokens is longer than the %d the model was trained with: "
                  "expect degraded output past %d", s->n_ctx, model->info.n_ctx_train, model->info.n_ctx_train);
    }
    *out       = s;
    return pymoe_ok();
}

void pymoe_session_free(pymoe_session * s) {
    if (!s) {
        return;
    }
    llama_batch_free(s->batch);
    pymoe_mtp_free(s->mtp);  /* its context reads this one's */
    llama_free(s->ctx);
    pymoe_eval_watch_free(s->watch);
    pymoe_routing_free(s->routing);
    free(s->scratch);
    free(s->ckpt);
    free(s);
}

static void drop_logits(pymoe_session * s) {
    s->logits       = NULL;
    s->n_logit_rows = 0;
    s->rewindable   = 0;  /* every caller also moved the position some other way than a feed */
}

/* Put the session back at position pos after a failed decode. */
static void roll_back(pymoe_session * s, int32_t pos) {
    if (!llama_memory_seq_rm(s->mem, 0, pos, -1)) {
        llama_memory_clear(s->mem, true);  /* recurrent state cannot drop positions: start over */
        pos = 0;
    }
    s->pos = pos;
    if (s->pos < s->ckpt_pos) {
        s->ckpt_pos = -1;
    }
}

static int32_t decode_status(int32_t rc) {
    switch (rc) {
        case 1:  return PYMOE_ECONTEXT;
        case 2:  return PYMOE_EABORTED;
        case -1: return PYMOE_EINVAL;
        default: return PYMOE_EBACKEND;
    }
}

int32_t pymoe_session_feed(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, bool all_logits) {
    return pymoe_session_feed_rows(s, tokens, n_tokens, all_logits ? 0 : n_tokens - 1);
}

int32_t pymoe_session_feed_rows(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, int32_t first) {
    if (!s || n_tokens <= 0 || !tokens) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_feed: need a session and at least one token");
    }
    const bool all_logits = first < n_tokens - 1;
    int32_t rc = pymoe_check_tokens(s->model, tokens, n_tokens);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n_tokens > s->n_ctx - s->pos) {
        return pymoe_fail(PYMOE_ECONTEXT, "%d tokens do not fit: %d of the context's %d positions are used",
                          n_tokens, s->pos, s->n_ctx);
    }
    if (all_logits && n_tokens > s->n_batch) {
        return pymoe_fail(PYMOE_EINVAL, "logits of every position need n_tokens (%d) <= n_batch (%d)", n_tokens,
                          s->n_batch);
    }
    drop_logits(s);
    pymoe_routing_clear(s->routing);
    s->interrupts       = pymoe_interrupt_count();
    const int32_t start = s->pos;
    for (int32_t done = 0; done < n_tokens;) {
        int32_t n = n_tokens - done < s->n_batch ? n_tokens - done : s->n_batch;
        for (int32_t i = 0; i < n; i++) {
            s->batch.token[i]     = tokens[done + i];
            s->batch.pos[i]       = s->pos + i;
            s->batch.n_seq_id[i]  = 1;
            s->batch.seq_id[i][0] = 0;
            s->batch.logits[i]    = done + i >= first;
        }
        s->batch.n_tokens = n;
        pymoe_llama_clear_error();
        pymoe_expert_cache_begin(s->model->cache, s->watch);
        int32_t rc = llama_decode(s->ctx, s->batch);
        pymoe_expert_cache_end(s->model->cache, s->ctx, s->watch, rc == 0, &s->cache_stats);
        if (rc != 0) {
            roll_back(s, start);
            if (rc == 2) {
                return pymoe_fail(PYMOE_EABORTED, "the feed was stopped (an interrupt, or the session's abort "
                                  "callback); the session is back at position %d", s->pos);
            }
            const char * why = pymoe_llama_last_error();
            return pymoe_fail(decode_status(rc), "llama_decode failed (%d) at position %d: %s", rc, s->pos,
                              why[0] ? why : "(no message)");
        }
        s->pos += n;
        done += n;
        /* snapshots hold the state before each of the last chunk's final tokens */
        s->rewindable = n - 1 < s->n_rs_seq ? n - 1 : s->n_rs_seq;
    }
    int32_t       rows = n_tokens - first;
    const float * head = llama_get_logits_ith(s->ctx, rows > 1 ? first : -1);  /* rows > 1: one chunk */
    const float * last = llama_get_logits_ith(s->ctx, -1);
    /* one contiguous block, in feed order: what the header promises */
    if (!head || last != head + (size_t) (rows - 1) * s->n_vocab) {
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp returned logits in an unexpected layout");
    }
    s->logits       = head;
    s->n_logit_rows = rows;
    return pymoe_ok();
}

int32_t pymoe_session_logits(pymoe_session * s, const float ** rows, int32_t * n_rows) {
    if (!s || !rows || !n_rows) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_logits: NULL argument");
    }
    if (!s->logits) {
        return pymoe_fail(PYMOE_ESTATE, "no logits: feed tokens first (rewind, reset and state load discard them)");
    }
    *rows   = s->logits;
    *n_rows = s->n_logit_rows;
    return pymoe_ok();
}

int32_t pymoe_session_rewind(pymoe_session * s, int32_t n) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_rewind: session is NULL");
    }
    if (n < 0 || n > s->pos) {
        return pymoe_fail(PYMOE_EINVAL, "cannot rewind %d positions: the session holds %d", n, s->pos);
    }
    if (n == 0) {
        drop_logits(s);
        return pymoe_ok();
    }
    if (s->recurrent && n > s->rewindable) {
        return pymoe_fail(PYMOE_EUNSUPPORTED,
                          "this model keeps recurrent state, which can rewind %d position(s) now, not %d (%d "
                          "snapshot(s), once per feed, within its last chunk); restore a checkpoint instead",
                          s->rewindable, n, s->n_rs_seq);
    }
    if (!llama_memory_seq_rm(s->mem, 0, s->pos - n, -1)) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "this model's memory cannot drop the last %d positions", n);
    }
    drop_logits(s);
    s->pos -= n;
    if (s->pos < s->ckpt_pos) {
        s->ckpt_pos = -1;  /* what follows may differ from what the checkpoint saw */
    }
    return pymoe_ok();
}

int32_t pymoe_session_rewind_limit(const pymoe_session * s) {
    return !s ? 0 : s->recurrent ? s->rewindable : s->pos;
}
int32_t pymoe_session_n_rs_seq(const pymoe_session * s) { return s ? s->n_rs_seq : 0; }
bool    pymoe_session_is_recurrent(const pymoe_session * s) { return s && s->recurrent; }
size_t  pymoe_session_checkpoint_size(const pymoe_session * s) {
    /* what a checkpoint copies, wherever the copy lives */
    return s && s->recurrent ? llama_state_seq_get_size_ext(s->ctx, 0, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) : 0;
}

/* Only the recurrent part (PARTIAL_ONLY: the KV cache rewinds on its own), kept
 * in device buffers (ON_DEVICE: no round trip through host memory on a GPU). */
static const llama_state_seq_flags CKPT_FLAGS = LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY | LLAMA_STATE_SEQ_FLAGS_ON_DEVICE;

int32_t pymoe_session_checkpoint(pymoe_session * s) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_checkpoint: session is NULL");
    }
    if (!s->recurrent) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "%s keeps no recurrent state: rewind its KV cache instead",
                          s->model->info.arch);
    }
    size_t need = llama_state_seq_get_size_ext(s->ctx, 0, CKPT_FLAGS);
    if (need > s->ckpt_cap) {
        uint8_t * grown = realloc(s->ckpt, need);
        if (!grown) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory for a %zu-byte checkpoint", need);
        }
        s->ckpt     = grown;
        s->ckpt_cap = need;
    }
    s->ckpt_pos = -1;
    pymoe_llama_clear_error();
    size_t wrote = llama_state_seq_get_data_ext(s->ctx, s->ckpt, need, 0, CKPT_FLAGS);
    if (wrote == 0 || wrote > need) {
        const char * why = pymoe_llama_last_error();
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp could not save a checkpoint: %s", why[0] ? why : "(no message)");
    }
    s->ckpt_size = wrote;
    s->ckpt_pos  = s->pos;
    return pymoe_ok();
}

int32_t pymoe_session_restore(pymoe_session * s) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_restore: session is NULL");
    }
    if (s->ckpt_pos < 0) {
        return pymoe_fail(PYMOE_ESTATE, "no checkpoint to restore: save one first");
    }
    if (s->ckpt_pos > s->pos) {
        return pymoe_fail(PYMOE_ESTATE, "the checkpoint (position %d) is ahead of the session (position %d)",
                          s->ckpt_pos, s->pos);
    }
    drop_logits(s);
    pymoe_llama_clear_error();
    if (llama_state_seq_set_data_ext(s->ctx, s->ckpt, s->ckpt_size, 0, CKPT_FLAGS) != s->ckpt_size ||
        !llama_memory_seq_rm(s->mem, 0, s->ckpt_pos, -1)) {
        const char * why = pymoe_llama_last_error();
        llama_memory_clear(s->mem, true);
        s->pos      = 0;
        s->ckpt_pos = -1;
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp could not restore the checkpoint (the session was reset): %s",
                          why[0] ? why : "(no message)");
    }
    s->pos = s->ckpt_pos;
    return pymoe_ok();
}

int32_t pymoe_session_reset(pymoe_session * s) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_reset: session is NULL");
    }
    llama_memory_clear(s->mem, true);
    drop_logits(s);
    s->pos      = 0;
    s->ckpt_pos = -1;
    return pymoe_ok();
}

int32_t pymoe_session_position(const pymoe_session * s) { return s ? s->pos : 0; }
int32_t pymoe_session_n_ctx(const pymoe_session * s) { return s ? s->n_ctx : 0; }
int32_t pymoe_session_n_vocab(const pymoe_session * s) { return s ? s->n_vocab : 0; }
int32_t pymoe_session_n_threads(const pymoe_session * s) { return s ? llama_n_threads(s->ctx) : 0; }

/* A saved state: this header, then llama.cpp's sequence state. The header lets
 * a load reject foreign bytes before llama.cpp parses them. */
struct state_header {
    char     magic[8];   /* "PYMOES01" */
    uint64_t fingerprint; /* the model's vocab fingerprint */
    int32_t  pos;
    int32_t  n_ctx;
    uint64_t n_data;      /* bytes of llama.cpp state that follow */
};
static const char STATE_MAGIC[8] = { 'P', 'Y', 'M', 'O', 'E', 'S', '0', '1' };

int32_t pymoe_session_state_save(pymoe_session * s, uint8_t * buf, size_t capacity, size_t * n_out) {
    if (!s || !n_out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_state_save: NULL argument");
    }
    size_t n_data = llama_state_seq_get_size(s->ctx, 0);
    size_t total  = sizeof(struct state_header) + n_data;
    *n_out        = total;
    if (!buf) {
        return pymoe_ok();
    }
    if (capacity < total) {
        return pymoe_fail(PYMOE_ENOSPACE, "state needs %zu bytes, buffer has %zu", total, capacity);
    }
    struct state_header h;
    memset(&h, 0, sizeof(h));
    memcpy(h.magic, STATE_MAGIC, sizeof(h.magic));
    h.fingerprint = s->model->info.vocab_fingerprint;
    h.pos         = s->pos;
    h.n_ctx       = s->n_ctx;
    h.n_data      = n_data;
    memcpy(buf, &h, sizeof(h));
    size_t wrote = llama_state_seq_get_data(s->ctx, buf + sizeof(h), n_data, 0);
    if (wrote != n_data) {
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp wrote %zu of %zu state bytes", wrote, n_data);
    }
    return pymoe_ok();
}

int32_t pymoe_session_state_load(pymoe_session * s, const uint8_t * buf, size_t size) {
    if (!s || !buf) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_state_load: NULL argument");
    }
    struct state_header h;
    if (size < sizeof(h)) {
        return pymoe_fail(PYMOE_EINVAL, "%zu bytes is too short to be a saved session state", size);
    }
    memcpy(&h, buf, sizeof(h));
    if (memcmp(h.magic, STATE_MAGIC, sizeof(h.magic)) != 0) {
        return pymoe_fail(PYMOE_EINVAL, "not a pymoe session state (bad magic)");
    }
    if (h.fingerprint != s->model->info.vocab_fingerprint || h.n_ctx != s->n_ctx || h.pos < 0 || h.pos > s->n_ctx ||
        h.n_data != size - sizeof(h)) {
        return pymoe_fail(PYMOE_EINVAL, "state was saved from another model or context size (or is damaged)");
    }
    llama_memory_clear(s->mem, true);
    drop_logits(s);
    s->ckpt_pos = -1;
    s->pos = 0;
    pymoe_llama_clear_error();
    if (llama_state_seq_set_data(s->ctx, buf + sizeof(h), h.n_data, 0) != h.n_data) {
        llama_memory_clear(s->mem, true);
        const char * why = pymoe_llama_last_error();
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp rejected the saved state: %s", why[0] ? why : "(no message)");
    }
    s->pos = h.pos;
    return pymoe_ok();
}

int32_t pymoe_session_sample(pymoe_session * s, const struct pymoe_sampling_params * params, uint64_t * rng_state,
                             pymoe_token * out) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_sample: session is NULL");
    }
    if (!s->logits) {
        return pymoe_fail(PYMOE_ESTATE, "no logits to sample from: feed tokens first");
    }
    const float * last = s->logits + (size_t) (s->n_logit_rows - 1) * s->n_vocab;
    return pymoe_sample_with(last, s->n_vocab, params, rng_state, s->scratch, out);
}
