/* model.c - loading a GGUF model, its description, and its vocabulary. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void pymoe_model_params_default(struct pymoe_model_params * params) {
    if (!params) {
        return;
    }
    memset(params, 0, sizeof(*params));
    params->load_mode    = PYMOE_LOAD_NO_MMAP;  /* the point of pymoe: weights read once, not paged */
    params->n_gpu_layers = -1;
}

/* Fail early, with a precise message, on what llama.cpp would report vaguely. */
static int32_t check_file(const char * path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        return pymoe_fail(PYMOE_ENOENT, "'%s' is a directory, not a model file", path);
    }
    FILE * f = fopen(path, "rb");
    if (!f) {
        return pymoe_fail(PYMOE_ENOENT, "cannot open model file '%s': %s", path, strerror(errno));
    }
    unsigned char magic[4] = { 0 };
    size_t        got      = fread(magic, 1, sizeof(magic), f);
    fclose(f);
    if (got < 4 || memcmp(magic, "GGUF", 4) != 0) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s' is not a GGUF file (it does not start with the bytes \"GGUF\")", path);
    }
    return PYMOE_OK;
}

struct load_progress {
    const struct pymoe_model_params * params;
    bool                              aborted;
};

static bool on_progress(float fraction, void * data) {
    struct load_progress * lp = data;
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
}

int32_t pymoe_model_load(const struct pymoe_model_params * params, pymoe_model ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load: out is NULL");
    }
    *out = NULL;
    if (!params || !params->path || !params->path[0]) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_model_load: no model path given");
    }
    if (params->load_mode != PYMOE_LOAD_MMAP && params->load_mode != PYMOE_LOAD_NO_MMAP) {
        return pymoe_fail(PYMOE_EINVAL, "unknown load mode %d (expected mmap or no-mmap)", params->load_mode);
    }
    int32_t rc = check_file(params->path);
    if (rc != PYMOE_OK) {
        return rc;
    }
    pymoe_init();

    struct load_progress      progress = { params, false };
    struct llama_model_params lp       = llama_model_default_params();
    lp.n_gpu_layers                    = params->n_gpu_layers;
    lp.load_mode                       = params->load_mode == PYMOE_LOAD_MMAP ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    lp.progress_callback               = on_progress;
    lp.progress_callback_user_data     = &progress;

    pymoe_llama_clear_error();
    struct llama_model * lm = llama_model_load_from_file(params->path, lp);
    if (!lm) {
        const char * why = pymoe_llama_last_error();
        if (progress.aborted) {
            return pymoe_fail(PYMOE_EABORTED, "loading '%s' was aborted by the progress callback", params->path);
        }
        if (strstr(why, "alloc")) {
            return pymoe_fail(PYMOE_ENOMEM, "not enough memory to load '%s': %s", params->path, why);
        }
        return pymoe_fail(PYMOE_EFORMAT, "llama.cpp could not load '%s': %s", params->path,
                          why[0] ? why : "(no message)");
    }
    struct pymoe_model * m = calloc(1, sizeof(*m));
    if (!m) {
        llama_model_free(lm);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    m->llama = lm;
    m->vocab = llama_model_get_vocab(lm);
    describe(m);
    *out = m;
    return pymoe_ok();
}

void pymoe_model_free(pymoe_model * model) {
    if (!model) {
        return;
    }
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
    int32_t n = llama_tokenize(model->vocab, text ? text : "", text_len, out, capacity, add_special, parse_special);
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
    int32_t n = llama_detokenize(model->vocab, tokens, n_tokens, out, capacity, false, render_special);
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
    int32_t n = llama_token_to_piece(model->vocab, token, out, capacity, 0, render_special);
    if (n < 0) {
        *n_out = -n;
        return pymoe_fail(PYMOE_ENOSPACE, "token piece needs room for %d bytes, got %d", -n, capacity);
    }
    *n_out = n;
    return pymoe_ok();
}

bool pymoe_model_token_is_eog(const pymoe_model * model, pymoe_token token) {
    return model && token >= 0 && token < model->info.n_vocab && llama_vocab_is_eog(model->vocab, token);
}
