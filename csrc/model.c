/* model.c - loading a GGUF model, its description, and its vocabulary. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"

struct load_progress {
    const struct pymoe_model_params * params;
    uint32_t                          interrupts;  /* pymoe_interrupt_count() when the load began */
    bool                              interrupted;
    bool                              aborted;
    struct pymoe_anon_regions *       before;   /* this process's anonymous regions before the load */
    bool                              advised;  /* its new regions were advised for huge pages (huge_pages.c) */
};

static bool on_progress(float fraction, void * data) {
    struct load_progress * lp = data;
    if (lp->before && !lp->advised) {  /* the buffers exist now, and are mostly not yet read into */
        lp->advised = true;
        pymoe_log(PYMOE_LOG_DEBUG, "%.0f MiB of new buffers advised for huge pages",
                  (double) pymoe_huge_pages_advise(lp->before, false) / 1048576.0);
    }
    if (pymoe_interrupt_count() != lp->interrupts) {
        lp->interrupted = true;
        return false;
    }
    if (lp->params->progress && !lp->params->progress(fraction, lp->params->progress_user_data)) {
        lp->aborted = true;
        return false;
    }
    return true;
}

int32_t pymoe_meta_int(const pymoe_model * model, const char * key, int32_t fallback) {
    char name[128];
    char value[64];
    snprintf(name, sizeof(name), "%s.%s", model->info.arch, key);
    if (llama_model_meta_val_str(model->llama, name, value, sizeof(value)) < 0) {
        return fallback;
    }
    return (int32_t) strtol(value, NULL, 10);
}

/* FNV-1a over each token's text and attributes, so that a draft and a target
 * can be checked for the same tokenizer without comparing 100k strings. */
static uint64_t vocab_fingerprint(const struct llama_vocab * vocab, int32_t n_vocab) {
    uint64_t h = 1469598103934665603ull;
#define FNV_BYTE(b) (h = (h ^ (uint8_t) (b)) * 1099511628211ull)
    for (int32_t t = 0; t < n_vocab; t++) {
        for (const char * c = llama_vocab_get_text(vocab, t); c && *c; c++) {
            FNV_BYTE(*c);
        }
        uint32_t attr = (uint32_t) llama_vocab_get_attr(vocab, t);
        for (int i = 0; i < 4; i++) {
            FNV_BYTE(attr >> (8 * i));
        }
        FNV_BYTE(0xff);  /* separator: "ab","c" differs from "a","bc" */
    }
#undef FNV_BYTE
    return h;
}

static void describe(struct pymoe_model * m) {
    struct pymoe_model_info * info  = &m->info;
    const struct llama_model * lm   = m->llama;
    memset(info, 0, sizeof(*info));
    if (llama_model_meta_val_str(lm, "general.architecture", info->arch, sizeof(info->arch)) < 0) {
        info->arch[0] = '\0';
    }
    llama_model_desc(lm, info->desc, sizeof(info->desc));
    info->n_params       = llama_model_n_params(lm);
    info->n_bytes        = llama_model_size(lm);
    info->n_layers       = llama_model_n_layer(lm);
    info->n_embd         = llama_model_n_embd(lm);
    info->n_head         = llama_model_n_head(lm);
    info->n_head_kv      = llama_model_n_head_kv(lm);
    info->n_ctx_train    = llama_model_n_ctx_train(lm);
    info->n_experts      = pymoe_meta_int(m, "expert_count", 0);
    info->n_experts_used = pymoe_meta_int(m, "expert_used_count", 0);
    info->n_vocab        = llama_vocab_n_tokens(m->vocab);
    info->bos            = llama_vocab_bos(m->vocab);
    info->eos            = llama_vocab_eos(m->vocab);
    info->vocab_fingerprint = vocab_fingerprint(m->vocab, info->n_vocab);
    info->is_recurrent   = llama_model_is_recurrent(lm);
    info->is_hybrid      = llama_model_is_hybrid(lm);
    info->n_nextn_layers = llama_model_n_layer_nextn(lm);
}

/* llama.cpp logs "load_tensors: <name> model buffer size = <x> MiB" once per
 * weight buffer (the only account of what it allocated where), and only a
 * warning "failed to mlock ..." when a lock fails. */
static void on_load_line(int32_t level, const char * line, void * data) {
    struct pymoe_load_report * r = data;
    if (strstr(line, "failed to mlock")) {
        r->lock_failures++;
    }
    if (strstr(line, "of pinned memory")) {  /* ggml-cuda: "failed to allocate X MiB of pinned memory" */
        r->pin_failures++;
    }
    if (r->n_buffers < (int32_t) (sizeof(r->buffers) / sizeof(r->buffers[0])) &&
        pymoe_parse_buffer_line(line, &r->buffers[r->n_buffers])) {
        r->n_buffers++;
    }
    (void) level;
}

/* A buffer's device: the offload device whose buffer type has its name; host buffers are the CPU's. */
static int32_t buffer_device(const char * name, const struct pymoe_devices * devices) {
    if (pymoe_is_host_buffer(name)) {
        return 0;
    }
    for (int32_t d = 0; d < devices->n; d++) {
        if (strcmp(name, ggml_backend_buft_name(ggml_backend_dev_buffer_type(devices->dev[d]))) == 0) {
            return d + 1;
        }
    }
    return -1;
}

/* After an mlock load: did the locks (or pinning) cover every host weight
 * byte? llama.cpp only warns when mlock fails. VmLck cannot be compared
 * before and after: freed buffers stay locked in the heap and are reused. */
static int32_t check_locked(const struct pymoe_load_report * r) {
    uint64_t slack = 16384u * (uint64_t) (r->n_buffers + 1);  /* sizes in the log are rounded to 0.01 MiB */
    if (r->lock_failures == 0 && r->locked_bytes + r->pinned_bytes + slack >= r->host_bytes) {
        return PYMOE_OK;
    }
    return pymoe_fail(PYMOE_ENOMEM,
                      "mlock: llama.cpp could not lock all %.1f MiB of weights in RAM (%d lock(s) failed, %.1f MiB "
                      "locked by this process); raise RLIMIT_MEMLOCK (`ulimit -l unlimited` as root, "
                      "LimitMEMLOCK=infinity in a systemd unit) or load with no-mmap",
                      r->host_bytes / 1048576.0, r->lock_failures, r->locked_bytes / 1048576.0);
}

/* The pre-check (placement, memory, lockability) and the load request as
 * llama.cpp's params (*lp, to free), into r; the devices it resolved. */
static int32_t plan_load(const struct pymoe_model_params * params, pymoe_model * m, struct pymoe_devices * devices,
                         struct pymoe_llama_params ** lp) {
    struct pymoe_load_report * r  = &m->report;
    int32_t                    rc = pymoe_memory_precheck(params, &r->plan, devices, m->kv_elements);
    if (rc == PYMOE_OK && !r->plan.fits) {
        rc = pymoe_fail(PYMOE_ENOMEM, "not loading '%s': %s", params->path, r->plan.problem);
    }
    if (rc == PYMOE_OK && params->load_mode == PYMOE_LOAD_MLOCK && !r->plan.lockable) {
        rc = pymoe_fail(PYMOE_ENOMEM, "cannot load '%s' with mlock: %s", params->path, r->plan.problem);
    }
    r->load_mode = r->plan.load_mode;
    r->fell_back = params->load_mode == PYMOE_LOAD_AUTO && r->load_mode != PYMOE_LOAD_MLOCK;
    *lp = rc == PYMOE_OK ? malloc(sizeof(**lp)) : NULL;
    if (rc == PYMOE_OK && !*lp) {
        rc = pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    rc = rc == PYMOE_OK ? pymoe_llama_params(params, devices, r->load_mode, *lp) : rc;
    if (rc != PYMOE_OK) {
        free(*lp);
        *lp = NULL;
        return rc;
    }
    if (r->fell_back) {
        pymoe_log(PYMOE_LOG_WARN, "loading without locking (no-mmap): %s", r->plan.problem);
    }
    return PYMOE_OK;
}

/* llama.cpp reads the weights (progress, Ctrl-C, huge pages for what it
 * reads into RAM); a failure in words: interrupted, aborted, out of memory,
 * or what llama.cpp could not load. */
static int32_t read_weights(const struct pymoe_model_params * params, struct pymoe_load_report * r,
                            struct pymoe_llama_params * lp, struct llama_model ** out) {
    struct load_progress progress      = { params, pymoe_interrupt_count(), false, false, NULL, false };
    lp->params.progress_callback           = on_progress;
    lp->params.progress_callback_user_data = &progress;
    if (r->load_mode != PYMOE_LOAD_MMAP) {
        progress.before = pymoe_anon_regions_now();
    }
    double t0 = pymoe_now();
    pymoe_llama_clear_error();
    pymoe_log_observe(on_load_line, r);
    struct llama_model * lm = pymoe_guarded_model_load(params->path, lp->params);
    pymoe_log_observe(NULL, NULL);
    if (lm && progress.before) {
        if (!progress.advised) {
            pymoe_huge_pages_advise(progress.before, false);
        }
        /* locking filled them with small pages before the read: collapse them,
         * on CPU-only builds (a GPU build keeps weights in RAM in pinned host
         * buffers, which cannot move; and the copy costs load time, 1-5 s per
         * GiB on the development VM) */
        const bool gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) ||
                         ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
        if (r->load_mode == PYMOE_LOAD_MLOCK && !gpu) {
            pymoe_huge_pages_advise(progress.before, true);
        }
    }
    pymoe_anon_regions_free(progress.before);
    r->load_seconds = pymoe_now() - t0;
    *out            = lm;
    if (lm) {
        return PYMOE_OK;
    }
    const char * why = pymoe_llama_last_error();
    if (progress.interrupted) {
        return pymoe_fail(PYMOE_EABORTED, "loading '%s' was interrupted", params->path);
    }
    if (progress.aborted) {
        return pymoe_fail(PYMOE_EABORTED, "loading '%s' was aborted by the progress callback", params->path);
    }
    if (pymoe_llama_ran_out_of_memory()) {
        return pymoe_fail(PYMOE_ENOMEM, "not enough memory to load '%s': %s", params->path, why);
    }
    return pymoe_fail(PYMOE_EFORMAT, "llama.cpp could not load '%s': %s", params->path, why[0] ? why : "(no message)");
}

/* Where the weights went, as llama.cpp's log told (buffers by device, in
 * RAM, pinned), and whether the lock held. */
static int32_t account_buffers(const struct pymoe_model_params * params, struct pymoe_load_report * r,
                               const struct pymoe_devices * devices) {
    r->locked_bytes    = pymoe_locked_bytes_now();
    uint64_t all_bytes = 0;
    for (int32_t i = 0; i < r->n_buffers; i++) {
        struct pymoe_buffer_size * b = &r->buffers[i];
        b->device = buffer_device(b->name, devices);
        r->device_bytes[b->device >= 0 ? b->device : 0] += b->device >= 0 ? b->n_bytes : 0;
        all_bytes += b->n_bytes;
        r->host_bytes += pymoe_is_host_buffer(b->name) && r->load_mode != PYMOE_LOAD_MMAP ? b->n_bytes : 0;
        r->pinned_bytes += strstr(b->name, "_Host") ? b->n_bytes : 0;
    }
    r->bytes_per_second = r->load_seconds > 0 ? (double) all_bytes / r->load_seconds : 0.0;
    if (r->pin_failures > 0) {
        pymoe_log(PYMOE_LOG_WARN, "%d pinned host buffer(s) could not be allocated: those weights are in pageable "
                  "memory (slower transfers to the GPU)", r->pin_failures);
    }
    int32_t rc = r->load_mode == PYMOE_LOAD_MLOCK ? check_locked(r) : PYMOE_OK;
    if (rc != PYMOE_OK && params->load_mode == PYMOE_LOAD_AUTO) {
        /* auto locks when it can: a lock the kernel refused after all (the
         * pre-check said it would fit) leaves the loaded weights usable */
        pymoe_log(PYMOE_LOG_WARN, "%s", pymoe_last_error());
        r->fell_back = true;
        rc = PYMOE_OK;
    }
    return rc;
}

/* The loaded model as pymoe's: its tokenizer (required), its description, its expert cache. */
static int32_t adopt(const struct pymoe_model_params * params, pymoe_model * m, struct llama_model * lm) {
    m->llama = lm;
    m->vocab = llama_model_get_vocab(lm);
    if (llama_vocab_type(m->vocab) == LLAMA_VOCAB_TYPE_NONE) {  /* llama.cpp asserts in every text call */
        return pymoe_fail(PYMOE_EUNSUPPORTED, "'%s' has no tokenizer (tokenizer.ggml.model is \"none\" or absent): "
                          "pymoe runs models with their vocabulary", params->path);
    }
    describe(m);
    m->info.mtp_loaded = params->mtp;
    int32_t rc = pymoe_expert_cache_create(m, params->moe_cache_mib, params->moe_cache_uploads);
    if (rc == PYMOE_OK && m->cache_info.note[0]) {
        pymoe_log(m->cache_info.enabled ? PYMOE_LOG_INFO : PYMOE_LOG_WARN, "%s", m->cache_info.note);
    }
    return rc;
}

int32_t pymoe_model_load(const struct pymoe_model_params * params, pymoe_model ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load: out is NULL");
    }
    *out = NULL;
    if (!params) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load: params is NULL");
    }
    struct pymoe_model_params local;
    int32_t                   rc = pymoe_model_params_in(params, &local);
    if (rc != PYMOE_OK) {
        return rc;
    }
    params = &local;
    if (!params->path || !params->path[0]) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load: no model path given");
    }
    struct pymoe_model * m = calloc(1, sizeof(*m));
    if (!m) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    struct pymoe_devices        devices;
    struct pymoe_llama_params * lp = NULL;
    struct llama_model *        lm = NULL;
    rc                             = plan_load(params, m, &devices, &lp);
    rc = rc == PYMOE_OK ? read_weights(params, &m->report, lp, &lm) : rc;
    free(lp);
    if (rc == PYMOE_OK) {
        pymoe_rpc_arm_all(params->rpc_servers);  /* a server silent past the timeout: lost, not waited on forever */
    }
    rc = rc == PYMOE_OK ? account_buffers(params, &m->report, &devices) : rc;
    rc = rc == PYMOE_OK ? adopt(params, m, lm) : rc;
    if (rc != PYMOE_OK) {
        if (lm) {
            llama_model_free(lm);
        }
        free(m);
        return rc;
    }
    *out = m;
    return pymoe_ok();
}

int32_t pymoe_model_load_report(const pymoe_model * model, struct pymoe_load_report * out) {
    if (!model || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load_report: NULL argument");
    }
    struct pymoe_load_report full = model->report;
    int32_t rc = pymoe_struct_out(out, &full, sizeof(full), offsetof(struct pymoe_load_report, load_mode),
                                  "pymoe_load_report");
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

void pymoe_model_free(pymoe_model * model) {
    if (!model) {
        return;
    }
    pymoe_expert_cache_free(model->cache);  /* its registrations name the model's tensors */
    llama_model_free(model->llama);
    free(model);
}

int32_t pymoe_model_info(const pymoe_model * model, struct pymoe_model_info * out) {
    if (!model || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_info: NULL argument");
    }
    *out = model->info;
    return pymoe_ok();
}

int32_t pymoe_model_tokenize(const pymoe_model * model, const char * text, int32_t text_len, bool add_special,
                             bool parse_special, pymoe_token * out, int32_t capacity, int32_t * n_out) {
    if (!model || !n_out || (text_len > 0 && !text) || text_len < 0 || capacity < 0 || (capacity > 0 && !out)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_tokenize: invalid arguments");
    }
    int32_t n  = 0;
    int32_t rc = pymoe_guarded_tokenize(model->vocab, text ? text : "", text_len, out, capacity, add_special,
                                        parse_special, &n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n == INT32_MIN) {
        return pymoe_fail(PYMOE_EINVAL, "text of %d bytes gives more tokens than an int32 can count", text_len);
    }
    if (n < 0) {
        *n_out = -n;
        return pymoe_fail(PYMOE_ENOSPACE, "tokenize needs room for %d tokens, got %d", -n, capacity);
    }
    *n_out = n;
    return pymoe_ok();
}

int32_t pymoe_check_tokens(const pymoe_model * model, const pymoe_token * tokens, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= model->info.n_vocab) {
            return pymoe_fail(PYMOE_ETOKEN, "token %d (at index %d) is outside the vocabulary [0, %d)", tokens[i], i,
                              model->info.n_vocab);
        }
    }
    return PYMOE_OK;
}

int32_t pymoe_model_detokenize(const pymoe_model * model, const pymoe_token * tokens, int32_t n_tokens,
                               bool render_special, char * out, int32_t capacity, int32_t * n_out) {
    if (!model || !n_out || n_tokens < 0 || (n_tokens > 0 && !tokens) || capacity < 0 || (capacity > 0 && !out)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_detokenize: invalid arguments");
    }
    int32_t rc = pymoe_check_tokens(model, tokens, n_tokens);
    if (rc != PYMOE_OK) {
        return rc;
    }
    int32_t n = 0;
    rc        = pymoe_guarded_detokenize(model->vocab, tokens, n_tokens, out, capacity, render_special, &n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n < 0) {
        *n_out = -n;
        return pymoe_fail(PYMOE_ENOSPACE, "detokenize needs room for %d bytes, got %d", -n, capacity);
    }
    *n_out = n;
    return pymoe_ok();
}

int32_t pymoe_model_token_piece(const pymoe_model * model, pymoe_token token, bool render_special, char * out,
                                int32_t capacity, int32_t * n_out) {
    if (!model || !n_out || capacity < 0 || (capacity > 0 && !out)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_token_piece: invalid arguments");
    }
    int32_t rc = pymoe_check_tokens(model, &token, 1);
    if (rc != PYMOE_OK) {
        return rc;
    }
    int32_t n = 0;
    rc        = pymoe_guarded_token_piece(model->vocab, token, out, capacity, render_special, &n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n < 0) {
        *n_out = -n;
        return pymoe_fail(PYMOE_ENOSPACE, "token piece needs room for %d bytes, got %d", -n, capacity);
    }
    *n_out = n;
    return pymoe_ok();
}

int32_t pymoe_model_chat_format(const pymoe_model * model, const struct pymoe_chat_message * messages,
                                int32_t n_messages, bool add_assistant, char * out, int32_t capacity,
                                int32_t * n_out) {
    if (!model || !n_out || n_messages < 0 || (n_messages > 0 && !messages) || capacity < 0 || (capacity > 0 && !out)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_chat_format: invalid arguments");
    }
    const char * tmpl = llama_model_chat_template(model->llama, NULL);
    if (!tmpl) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "this model has no chat template (GGUF tokenizer.chat_template)");
    }
    struct llama_chat_message * chat = calloc((size_t) (n_messages > 0 ? n_messages : 1), sizeof(*chat));
    if (!chat) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    for (int32_t i = 0; i < n_messages; i++) {
        if (!messages[i].role || !messages[i].content) {
            free(chat);
            return pymoe_fail(PYMOE_EINVAL, "chat message %d has no role or no content", i);
        }
        chat[i] = (struct llama_chat_message) { messages[i].role, messages[i].content };
    }
    int32_t n  = 0;
    int32_t rc = pymoe_guarded_chat_template(tmpl, chat, (size_t) n_messages, add_assistant, out, capacity, &n);
    free(chat);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (n < 0) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "llama.cpp does not know this model's chat template");
    }
    *n_out = n;
    if (n > capacity) {
        return pymoe_fail(PYMOE_ENOSPACE, "the formatted chat needs %d bytes, got %d", n, capacity);
    }
    return pymoe_ok();
}

bool pymoe_model_token_is_eog(const pymoe_model * model, pymoe_token token) {
    return model && token >= 0 && token < model->info.n_vocab && llama_vocab_is_eog(model->vocab, token);
}

int32_t pymoe_model_control_tokens(const pymoe_model * model, pymoe_token * out, uint8_t * strip, int32_t capacity,
                                   int32_t * n_out) {
    if (!model || !n_out || capacity < 0 || (capacity > 0 && !out)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_control_tokens: invalid arguments");
    }
    int32_t n = 0;
    for (pymoe_token t = 0; t < model->info.n_vocab; t++) {
        enum llama_token_attr attr = llama_vocab_get_attr(model->vocab, t);
        if (attr & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN)) {
            if (n < capacity) {
                out[n] = t;
                if (strip) {
                    strip[n] = (uint8_t) ((attr & LLAMA_TOKEN_ATTR_LSTRIP ? PYMOE_STRIP_LEFT : 0) |
                                          (attr & LLAMA_TOKEN_ATTR_RSTRIP ? PYMOE_STRIP_RIGHT : 0));
                }
            }
            n++;
        }
    }
    *n_out = n;
    if (n > capacity) {
        return pymoe_fail(PYMOE_ENOSPACE, "%d control tokens, room for %d", n, capacity);
    }
    return pymoe_ok();
}
