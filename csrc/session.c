/* session.c - one llama.cpp context: feed tokens, read logits, rewind, save state
 * (its params are checked and translated in context_params.c). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* llama.cpp's abort callback (between graph nodes): an interrupt since the feed began, or the caller's request. */
static bool should_abort(void * data) {
    const pymoe_session * s = data;
    return pymoe_interrupt_count() != s->interrupts || (s->abort && s->abort(s->abort_user_data));
}

/* Is there memory for the KV cache (CPU-only builds: on a GPU llama.cpp says so itself)? */
static int32_t check_kv_memory(const pymoe_model * model, const struct pymoe_session_params * params, uint32_t n_ctx) {
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
    return PYMOE_OK;
}

int32_t pymoe_session_create(pymoe_model * model, const struct pymoe_session_params * params, pymoe_session ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_create: out is NULL");
    }
    if (!model || !params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_create: model and params are required");
    }
    struct pymoe_session_params local;
    int32_t                     rc = pymoe_session_params_in(params, &local);
    if (rc != PYMOE_OK) {
        return rc;
    }
    params = &local;
    struct llama_context_params cp;
    rc = pymoe_context_params(model, params, &cp);
    rc = rc == PYMOE_OK ? check_kv_memory(model, params, cp.n_ctx) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
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
        int32_t      status = pymoe_llama_ran_out_of_memory() ? PYMOE_ENOMEM : PYMOE_EBACKEND;
        return pymoe_fail(status, "could not create a context of %u tokens: %s", cp.n_ctx,
                          why[0] ? why : "(no message)");
    }
    struct pymoe_session * s = calloc(1, sizeof(*s));
    int32_t                n_vocab = model->info.n_vocab;
    if (s) {
        s->scratch = malloc(PYMOE_SAMPLING_SCRATCH(n_vocab));
        s->tokens  = malloc(sizeof(*s->tokens) * (size_t) llama_n_ctx(ctx));
    }
    if (!s || !s->scratch || !s->tokens) {
        if (s) {
            free(s->scratch);
            free(s->tokens);
        }
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
    free(s->tokens);
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

/* A loop's sessions hold what the loop decided: a change from outside would
 * leave the loop's record of the sequence wrong. */
static int32_t refuse_in_loop(const pymoe_session * s, const char * what) {
    if (!s) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_%s: session is NULL", what);
    }
    if (s->in_loop) {
        return pymoe_fail(PYMOE_ESTATE, "pymoe_session_%s: this session belongs to a speculative loop, which "
                          "keeps the sequence: use the loop's calls (feed, rewind, reset), or free the loop first",
                          what);
    }
    return PYMOE_OK;
}

int32_t pymoe_session_feed(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, bool all_logits) {
    int32_t rc = refuse_in_loop(s, "feed");
    return rc != PYMOE_OK ? rc : pymoe_owned_feed(s, tokens, n_tokens, all_logits ? 0 : n_tokens - 1);
}

int32_t pymoe_session_feed_rows(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, int32_t first) {
    int32_t rc = refuse_in_loop(s, "feed_rows");
    return rc != PYMOE_OK ? rc : pymoe_owned_feed(s, tokens, n_tokens, first);
}

int32_t pymoe_session_rewind(pymoe_session * s, int32_t n) {
    int32_t rc = refuse_in_loop(s, "rewind");
    return rc != PYMOE_OK ? rc : pymoe_owned_rewind(s, n);
}

int32_t pymoe_session_checkpoint(pymoe_session * s) {
    int32_t rc = refuse_in_loop(s, "checkpoint");
    return rc != PYMOE_OK ? rc : pymoe_owned_checkpoint(s);
}

int32_t pymoe_session_restore(pymoe_session * s) {
    int32_t rc = refuse_in_loop(s, "restore");
    return rc != PYMOE_OK ? rc : pymoe_owned_restore(s);
}

int32_t pymoe_session_reset(pymoe_session * s) {
    int32_t rc = refuse_in_loop(s, "reset");
    return rc != PYMOE_OK ? rc : pymoe_owned_reset(s);
}

int32_t pymoe_session_tokens(const pymoe_session * s, const pymoe_token ** tokens, int32_t * n) {
    if (!s || !tokens || !n) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_tokens: NULL argument");
    }
    *tokens = s->tokens;
    *n      = s->pos;
    return pymoe_ok();
}

int32_t pymoe_owned_feed(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, int32_t first) {
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
            s->tokens[s->pos + i] = tokens[done + i];
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

int32_t pymoe_owned_rewind(pymoe_session * s, int32_t n) {
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

int32_t pymoe_owned_checkpoint(pymoe_session * s) {
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

int32_t pymoe_owned_restore(pymoe_session * s) {
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

int32_t pymoe_owned_reset(pymoe_session * s) {
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

/* A saved state: this header, the tokens the context holds, then llama.cpp's
 * sequence state. The header names the model (its architecture, size and
 * tokenizer), the context size and the cache types, so that a load refuses
 * another model's bytes before llama.cpp parses them (llama.cpp would take
 * any state of the same shape). */
struct state_header {
    char     magic[8];    /* "PYMOES02" */
    char     arch[32];
    uint64_t n_params;
    uint64_t n_bytes;
    uint64_t fingerprint; /* the model's vocab fingerprint */
    int32_t  n_ctx;
    int32_t  type_k, type_v;
    int32_t  pos;         /* tokens that follow the header */
    uint64_t n_data;      /* bytes of llama.cpp state that follow the tokens */
};
static const char STATE_MAGIC[8] = { 'P', 'Y', 'M', 'O', 'E', 'S', '0', '2' };

static struct state_header header_of(const pymoe_session * s, uint64_t n_data) {
    struct state_header h;
    memset(&h, 0, sizeof(h));  /* padding too: the bytes may go to a file */
    memcpy(h.magic, STATE_MAGIC, sizeof(h.magic));
    snprintf(h.arch, sizeof(h.arch), "%s", s->model->info.arch);
    h.n_params    = s->model->info.n_params;
    h.n_bytes     = s->model->info.n_bytes;
    h.fingerprint = s->model->info.vocab_fingerprint;
    h.n_ctx       = s->n_ctx;
    h.type_k      = (int32_t) s->cparams.type_k;
    h.type_v      = (int32_t) s->cparams.type_v;
    h.pos         = s->pos;
    h.n_data      = n_data;
    return h;
}

int32_t pymoe_session_state_save(pymoe_session * s, uint8_t * buf, size_t capacity, size_t * n_out) {
    if (!s || !n_out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_state_save: NULL argument");
    }
    const size_t n_data = llama_state_seq_get_size(s->ctx, 0);
    const size_t n_tok  = sizeof(*s->tokens) * (size_t) s->pos;
    const size_t total  = sizeof(struct state_header) + n_tok + n_data;
    if (!buf) {
        *n_out = total;
        return pymoe_ok();
    }
    if (capacity < total) {
        *n_out = total;
        return pymoe_fail(PYMOE_ENOSPACE, "state needs %zu bytes, buffer has %zu", total, capacity);
    }
    const struct state_header h = header_of(s, n_data);
    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), s->tokens, n_tok);
    size_t wrote = llama_state_seq_get_data(s->ctx, buf + sizeof(h) + n_tok, n_data, 0);
    if (wrote != n_data) {
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp wrote %zu of %zu state bytes", wrote, n_data);
    }
    *n_out = total;
    return pymoe_ok();
}

/* What differs between a saved state's header and this session, in words ("" when nothing). */
static void describe_mismatch(const pymoe_session * s, const struct state_header * h, char * out, size_t size) {
    const struct state_header mine = header_of(s, 0);
    out[0] = 0;
    if (strncmp(h->arch, mine.arch, sizeof(h->arch)) != 0 || h->n_params != mine.n_params ||
        h->n_bytes != mine.n_bytes || h->fingerprint != mine.fingerprint) {
        snprintf(out, size, "it was saved from another model (%.32s, %llu parameters, %llu bytes of weights; this "
                 "session's model: %s, %llu parameters, %llu bytes%s)", h->arch, (unsigned long long) h->n_params,
                 (unsigned long long) h->n_bytes, mine.arch, (unsigned long long) mine.n_params,
                 (unsigned long long) mine.n_bytes, h->fingerprint != mine.fingerprint ? ", another tokenizer" : "");
    } else if (h->n_ctx != mine.n_ctx) {
        snprintf(out, size, "it was saved from a context of %d tokens, this session's holds %d", h->n_ctx, mine.n_ctx);
    } else if (h->type_k != mine.type_k || h->type_v != mine.type_v) {
        snprintf(out, size, "it was saved with KV cache types %s/%s, this session has %s/%s",
                 ggml_type_name((enum ggml_type) h->type_k), ggml_type_name((enum ggml_type) h->type_v),
                 ggml_type_name((enum ggml_type) mine.type_k), ggml_type_name((enum ggml_type) mine.type_v));
    }
}

int32_t pymoe_session_state_load(pymoe_session * s, const uint8_t * buf, size_t size) {
    if (!buf) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_state_load: NULL argument");
    }
    int32_t rc = refuse_in_loop(s, "state_load");
    return rc != PYMOE_OK ? rc : pymoe_owned_state_load(s, buf, size);
}

int32_t pymoe_owned_state_load(pymoe_session * s, const uint8_t * buf, size_t size) {
    struct state_header h;
    if (size < sizeof(h)) {
        return pymoe_fail(PYMOE_EINVAL, "%zu bytes is too short to be a saved session state", size);
    }
    memcpy(&h, buf, sizeof(h));
    if (memcmp(h.magic, STATE_MAGIC, 7) != 0) {
        return pymoe_fail(PYMOE_EINVAL, "not a pymoe session state (bad magic)");
    }
    if (h.magic[7] != STATE_MAGIC[7]) {
        return pymoe_fail(PYMOE_EINVAL, "a session state of another pymoe version (format %c, this one reads %c)",
                          h.magic[7], STATE_MAGIC[7]);
    }
    h.type_k = h.type_k >= 0 && h.type_k < GGML_TYPE_COUNT ? h.type_k : 0;
    h.type_v = h.type_v >= 0 && h.type_v < GGML_TYPE_COUNT ? h.type_v : 0;
    char why[256];
    describe_mismatch(s, &h, why, sizeof(why));
    if (why[0]) {
        return pymoe_fail(PYMOE_EINVAL, "the saved state does not fit this session: %s", why);
    }
    const size_t n_tok = sizeof(*s->tokens) * (size_t) (h.pos > 0 ? h.pos : 0);
    if (h.pos < 0 || h.pos > s->n_ctx || h.n_data != size - sizeof(h) - n_tok || size < sizeof(h) + n_tok) {
        return pymoe_fail(PYMOE_EINVAL, "the saved state is damaged (position %d, %zu bytes)", h.pos, size);
    }
    for (int32_t i = 0; i < h.pos; i++) {  /* the bytes may sit at any address */
        pymoe_token t;
        memcpy(&t, buf + sizeof(h) + sizeof(t) * (size_t) i, sizeof(t));
        if (t < 0 || t >= s->n_vocab) {
            return pymoe_fail(PYMOE_EINVAL, "the saved state is damaged: token %d at position %d is outside the "
                              "vocabulary", t, i);
        }
    }
    llama_memory_clear(s->mem, true);
    drop_logits(s);
    s->ckpt_pos = -1;
    s->pos = 0;
    pymoe_llama_clear_error();
    if (llama_state_seq_set_data(s->ctx, buf + sizeof(h) + n_tok, h.n_data, 0) != h.n_data) {
        llama_memory_clear(s->mem, true);
        const char * why_llama = pymoe_llama_last_error();
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp rejected the saved state (the session is now empty): %s",
                          why_llama[0] ? why_llama : "(no message)");
    }
    memcpy(s->tokens, buf + sizeof(h), n_tok);
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
    char          whose[64];
    snprintf(whose, sizeof whose, "the logits for position %d", s->pos);
    struct pymoe_sampling_params local;
    int32_t                      rc = pymoe_sampling_params_in(params, &local, &params);
    if (rc != PYMOE_OK || !pymoe_sampling_changes_logits(params)) {
        return rc != PYMOE_OK ? rc : pymoe_sample_with(last, s->n_vocab, params, rng_state, s->scratch, whose, out);
    }
    /* the row is llama.cpp's output buffer, read by nothing else during the call: changed for the draw, then
     * put back */
    struct pymoe_row_patch patch;
    rc = pymoe_row_patch((float *) last, s->n_vocab, params, false, s->tokens, s->pos, NULL, 0, &patch);
    if (rc != PYMOE_OK) {
        return rc;
    }
    rc = pymoe_sample_with(last, s->n_vocab, params, rng_state, s->scratch, whose, out);
    pymoe_row_unpatch(&patch);
    return rc;
}
