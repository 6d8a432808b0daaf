/* gguf_file.c - the one reader of GGUF headers in pymoe: file checks, the
 * tensor list of every part of a split model, and the metadata the pre-check
 * and the planner need. Reads no tensor data. A GGUF is untrusted input: every
 * value is read with its type checked, and what cannot be trusted is a typed
 * error naming the file and the key. */
#include "internal.h"

#include "ggml.h"
#include "gguf.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum {
    MAX_PARTS  = 128,  /* files of a split model */
    MAX_LAYERS  = PYMOE_MAX_LAYERS,  /* llama.cpp's LLAMA_MAX_LAYERS: more is not a model it can load */
    MAX_EXPERTS = 1024,  /* llama.cpp's LLAMA_MAX_EXPERTS */
};

struct pymoe_gguf {
    struct gguf_context *      parts[MAX_PARTS];
    int32_t                    n_parts;
    struct pymoe_tensor_size * tensors;  /* names point into the parts' contexts */
    int32_t                    n_tensors;
    struct pymoe_gguf_info     info;
    struct pymoe_gguf_layer *  layers;   /* info.n_layers */
};

int32_t pymoe_gguf_check_file(const char * path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        return pymoe_fail(PYMOE_ENOENT, "'%s' is a directory, not a model file", path);
    }
    FILE * f = fopen(path, "rb");
    if (!f && errno == ENOENT) {
        return pymoe_fail(PYMOE_ENOENT, "'%s': no such file", path);
    }
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

/* An integer value of any integer type; false when the key is absent. */
static int32_t meta_int(const struct gguf_context * ctx, const char * path, const char * key, int64_t * out,
                        bool * found) {
    int64_t id = gguf_find_key(ctx, key);
    *found     = id >= 0;
    if (id < 0) {
        return PYMOE_OK;
    }
    switch (gguf_get_kv_type(ctx, id)) {
        case GGUF_TYPE_UINT8:  *out = gguf_get_val_u8(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_INT8:   *out = gguf_get_val_i8(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_UINT16: *out = gguf_get_val_u16(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_INT16:  *out = gguf_get_val_i16(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_UINT32: *out = gguf_get_val_u32(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_INT32:  *out = gguf_get_val_i32(ctx, id); return PYMOE_OK;
        case GGUF_TYPE_UINT64: *out = gguf_get_val_u64(ctx, id) > INT64_MAX ? -1 : (int64_t) gguf_get_val_u64(ctx, id);
                               return PYMOE_OK;
        case GGUF_TYPE_INT64:  *out = gguf_get_val_i64(ctx, id); return PYMOE_OK;
        default:
            return pymoe_fail(PYMOE_EFORMAT, "'%s': metadata %s is a %s, not an integer", path, key,
                              gguf_type_name(gguf_get_kv_type(ctx, id)));
    }
}

/* An integer in [lo, hi], fallback when absent. */
static int32_t meta_range(const struct gguf_context * ctx, const char * path, const char * key, int64_t lo,
                          int64_t hi, int64_t fallback, int64_t * out) {
    bool    found = false;
    int32_t rc    = meta_int(ctx, path, key, out, &found);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (!found) {
        *out = fallback;
    } else if (*out < lo || *out > hi) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s': metadata %s = %" PRId64 " is outside [%" PRId64 ", %" PRId64 "]", path,
                          key, *out, lo, hi);
    }
    return PYMOE_OK;
}

/* A per-layer integer: one value for every layer, or an array of n_layers values. */
static int32_t meta_per_layer(const struct gguf_context * ctx, const char * path, const char * key, int64_t fallback,
                              int32_t n_layers, int64_t * out) {
    int64_t id = gguf_find_key(ctx, key);
    if (id >= 0 && gguf_get_kv_type(ctx, id) == GGUF_TYPE_ARRAY) {
        enum gguf_type t = gguf_get_arr_type(ctx, id);
        if ((t != GGUF_TYPE_UINT32 && t != GGUF_TYPE_INT32) || gguf_get_arr_n(ctx, id) != (size_t) n_layers) {
            return pymoe_fail(PYMOE_EFORMAT, "'%s': metadata %s is not an array of %d 32-bit integers", path, key,
                              n_layers);
        }
        const uint8_t * data = gguf_get_arr_data(ctx, id);
        for (int32_t il = 0; il < n_layers; il++) {
            uint32_t u;
            memcpy(&u, data + 4 * (size_t) il, 4);
            out[il] = t == GGUF_TYPE_INT32 ? (int64_t) (int32_t) u : (int64_t) u;
            if (out[il] < 0 || out[il] > 1 << 20) {
                return pymoe_fail(PYMOE_EFORMAT, "'%s': metadata %s[%d] = %" PRId64 " is out of range", path, key, il,
                                  out[il]);
            }
        }
        return PYMOE_OK;
    }
    int64_t v  = 0;
    int32_t rc = meta_range(ctx, path, key, 0, 1 << 20, fallback, &v);
    for (int32_t il = 0; rc == PYMOE_OK && il < n_layers; il++) {
        out[il] = v;
    }
    return rc;
}

/* The weights ggml computes with element by element (norms, biases: every
 * vector; the recurrent layers' convolution) must be F32: its CPU kernels
 * abort at the first decode on anything else. Converters store them so. */
static int32_t check_types(const struct gguf_context * ctx, const struct ggml_context * shapes, const char * path) {
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); i++) {
        const char *               name = gguf_get_tensor_name(ctx, i);
        const struct ggml_tensor * t    = ggml_get_tensor((struct ggml_context *) shapes, name);
        const enum ggml_type       type = gguf_get_tensor_type(ctx, i);
        if (t && type != GGML_TYPE_F32 && (ggml_n_dims(t) == 1 || strstr(name, "ssm_conv1d"))) {
            return pymoe_fail(PYMOE_EFORMAT, "'%s': tensor %s is stored as %s; llama.cpp computes with it element "
                              "by element, in F32 only", path, name, ggml_type_name(type));
        }
    }
    return PYMOE_OK;
}

static int32_t read_part(pymoe_gguf * g, const char * path) {
    int32_t rc = pymoe_gguf_check_file(path);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct ggml_context *   shapes = NULL;  /* the tensors' shapes (no data) */
    struct gguf_init_params gp     = { .no_alloc = true, .ctx = &shapes };
    pymoe_llama_clear_error();  /* ggml's parser logs why it stops */
    struct gguf_context * ctx = gguf_init_from_file(path, gp);
    if (!ctx) {
        const char * why = pymoe_llama_last_error();
        return pymoe_fail(PYMOE_EFORMAT, "cannot read the GGUF header of '%s' (truncated or corrupt): %s", path,
                          why[0] ? why : "no detail");
    }
    int32_t rc_types = check_types(ctx, shapes, path);
    ggml_free(shapes);
    if (rc_types != PYMOE_OK) {
        gguf_free(ctx);
        return rc_types;
    }
    g->parts[g->n_parts++] = ctx;
    int64_t n = gguf_get_n_tensors(ctx);
    if (n < 0 || n > INT32_MAX - g->n_tensors) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s' lists %" PRId64 " tensors", path, n);
    }
    void * grow = realloc(g->tensors, (size_t) (g->n_tensors + n) * sizeof(*g->tensors));
    if (!grow && g->n_tensors + n > 0) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    g->tensors = grow;
    struct stat st;
    uint64_t    file_size = stat(path, &st) == 0 ? (uint64_t) st.st_size : 0;
    uint64_t    data      = gguf_get_data_offset(ctx);
    for (int64_t i = 0; i < n; i++) {
        struct pymoe_tensor_size * t = &g->tensors[g->n_tensors++];
        t->name    = gguf_get_tensor_name(ctx, i);
        t->n_bytes = gguf_get_tensor_size(ctx, i);
        g->info.n_bytes += t->n_bytes;
        uint64_t offset = gguf_get_tensor_offset(ctx, i);  /* gguf checked offset + size against the next one */
        if (data > file_size || offset > file_size - data || t->n_bytes > file_size - data - offset) {
            return pymoe_fail(PYMOE_EFORMAT, "'%s' is truncated: tensor '%s' ends at byte %" PRIu64 " of a %" PRIu64
                              "-byte file", path, t->name, data + offset + t->n_bytes, file_size);
        }
    }
    return PYMOE_OK;
}

/* The other files of a split model, named as llama.cpp names them. */
static int32_t read_other_parts(pymoe_gguf * g, const char * path) {
    int64_t n_splits = 1;
    int32_t rc       = meta_range(g->parts[0], path, "split.count", 0, MAX_PARTS, 1, &n_splits);
    if (rc != PYMOE_OK || n_splits <= 1) {
        return rc;
    }
    char prefix[4096], part[4096];
    if (llama_split_prefix(prefix, sizeof(prefix), path, 0, (int) n_splits) <= 0) {
        return pymoe_fail(PYMOE_EINVAL, "'%s' is part of a %" PRId64 "-file split model: give the first part "
                          "(...-00001-of-%05" PRId64 ".gguf)", path, n_splits, n_splits);
    }
    int64_t no = 0;
    rc         = meta_range(g->parts[0], path, "split.no", 0, 0, 0, &no);  /* the first part is number 0 */
    for (int32_t i = 1; i < n_splits && rc == PYMOE_OK; i++) {
        llama_split_path(part, sizeof(part), prefix, i, (int) n_splits);
        rc = read_part(g, part);
        if (rc == PYMOE_ENOENT) {
            rc = pymoe_fail(PYMOE_ENOENT, "%s (a part of the split model '%s')", pymoe_last_error(), path);
        }
        int64_t count = 0;  /* a part of another split model, or out of place: its own numbers say so */
        rc = rc == PYMOE_OK ? meta_range(g->parts[i], part, "split.no", i, i, -1, &no) : rc;
        rc = rc == PYMOE_OK ? meta_range(g->parts[i], part, "split.count", n_splits, n_splits, -1, &count) : rc;
        if (rc == PYMOE_OK && (no != i || count != n_splits)) {
            rc = pymoe_fail(PYMOE_EFORMAT, "'%s' is not part %d of %" PRId64 " of '%s' (it has no split.no or "
                            "split.count)", part, i + 1, n_splits, path);
        }
    }
    int64_t n_tensors = 0;  /* all parts together hold what the first part announces */
    rc = rc == PYMOE_OK ? meta_range(g->parts[0], path, "split.tensors.count", 0, INT32_MAX, g->n_tensors,
                                     &n_tensors) : rc;
    if (rc == PYMOE_OK && n_tensors != g->n_tensors) {
        rc = pymoe_fail(PYMOE_EFORMAT, "'%s': the split model's parts hold %d tensors, split.tensors.count says %"
                        PRId64, path, g->n_tensors, n_tensors);
    }
    return rc;
}

/* Layer il of "blk.<il>.<rest>", or -1. */
static int32_t tensor_layer(const char * name) {
    if (strncmp(name, "blk.", 4) != 0) {
        return -1;
    }
    char * end = NULL;
    long   il  = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' && il >= 0 && il < MAX_LAYERS ? (int32_t) il : -1;
}

/* What one token costs each layer's KV cache, and one sequence its recurrent
 * state. Recurrent layers (gated delta-net, Mamba) are those with ssm_*
 * tensors: a convolution state ((d_conv - 1) x channels) and a d_state x
 * d_inner state, in F32, instead of KV. */
static int32_t read_layers(pymoe_gguf * g, const char * path) {
    const struct gguf_context * ctx  = g->parts[0];
    const char *                arch = g->info.arch;
    const int32_t               n    = g->info.n_layers;
    char                        key[160];
    g->layers = calloc((size_t) (n > 0 ? n : 1), sizeof(*g->layers));
    int64_t * head    = calloc((size_t) (n > 0 ? n : 1), sizeof(int64_t));
    int64_t * head_kv = calloc((size_t) (n > 0 ? n : 1), sizeof(int64_t));
    int32_t   rc      = g->layers && head && head_kv ? PYMOE_OK : pymoe_fail(PYMOE_ENOMEM, "out of memory");
    int64_t   n_embd = 0, k_len = 0, v_len = 0, d_conv = 0, d_inner = 0, d_state = 0, n_group = 0;
    if (rc == PYMOE_OK) {
        snprintf(key, sizeof(key), "%s.embedding_length", arch);
        rc = meta_range(ctx, path, key, 0, 1 << 20, 0, &n_embd);
    }
    if (rc == PYMOE_OK) {
        snprintf(key, sizeof(key), "%s.attention.head_count", arch);
        rc = meta_per_layer(ctx, path, key, 0, n, head);
    }
    for (int32_t il = 0; rc == PYMOE_OK && il < n; il++) {
        g->info.n_head = head[il] > g->info.n_head ? (int32_t) head[il] : g->info.n_head;
    }
    if (rc == PYMOE_OK) {  /* absent: as many KV heads as heads (layer 0's, as llama.cpp reads a scalar) */
        snprintf(key, sizeof(key), "%s.attention.head_count_kv", arch);
        rc = meta_per_layer(ctx, path, key, n > 0 ? head[0] : 0, n, head_kv);
    }
    const int64_t head_dim = g->info.n_head > 0 ? n_embd / g->info.n_head : 0;
    struct { const char * name; int64_t * value; int64_t fallback; } dims[] = {
        { "attention.key_length", &k_len, head_dim }, { "attention.value_length", &v_len, head_dim },
        { "ssm.conv_kernel", &d_conv, 0 },            { "ssm.inner_size", &d_inner, 0 },
        { "ssm.state_size", &d_state, 0 },            { "ssm.group_count", &n_group, 0 },
    };
    for (size_t i = 0; rc == PYMOE_OK && i < sizeof(dims) / sizeof(dims[0]); i++) {
        snprintf(key, sizeof(key), "%s.%s", arch, dims[i].name);
        rc = meta_range(ctx, path, key, 0, 1 << 20, dims[i].fallback, dims[i].value);
    }
    if (rc == PYMOE_OK) {
        g->info.n_embd = (int32_t) n_embd;
        const uint64_t state = (uint64_t) ((d_conv > 1 ? d_conv - 1 : 0) * (d_inner + 2 * n_group * d_state) +
                                           d_state * d_inner) * sizeof(float);
        for (int32_t i = 0; i < g->n_tensors; i++) {
            int32_t il = tensor_layer(g->tensors[i].name);
            if (il >= 0 && il < n && strstr(g->tensors[i].name, ".ssm_")) {
                g->layers[il].recurrent_bytes = state;
            }
        }
        for (int32_t il = 0; il < n; il++) {
            bool recurrent              = g->layers[il].recurrent_bytes > 0;
            g->layers[il].kv_k_elements = recurrent ? 0 : (uint64_t) (head_kv[il] * k_len);
            g->layers[il].kv_v_elements = recurrent ? 0 : (uint64_t) (head_kv[il] * v_len);
        }
    }
    free(head);
    free(head_kv);
    return rc;
}

/* The hyperparameters llama.cpp's loader asserts on (it aborts the process
 * where they are out of range), refused here with a typed error first. */
static int32_t check_llama_limits(const struct gguf_context * ctx, const char * path, const char * arch,
                                  int32_t n_layers) {
    char    key[160];
    int64_t n_expert = 0, n_groups = 0, n_group_used = 0;
    snprintf(key, sizeof(key), "%s.expert_count", arch);
    int32_t rc = meta_range(ctx, path, key, 0, MAX_EXPERTS, 0, &n_expert);
    int64_t used[MAX_LAYERS];
    snprintf(key, sizeof(key), "%s.expert_used_count", arch);
    rc = rc == PYMOE_OK ? meta_per_layer(ctx, path, key, 0, n_layers > 0 ? n_layers : 1, used) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    int64_t used_max = 0;
    for (int32_t il = 0; il < (n_layers > 0 ? n_layers : 1); il++) {
        used_max = used[il] > used_max ? used[il] : used_max;
    }
    if (used_max > n_expert || (n_expert > 0 && used_max == 0)) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s': %s.expert_used_count (%" PRId64 ") must be in [1, %s.expert_count = %"
                          PRId64 "]%s", path, arch, used_max, arch, n_expert, n_expert ? "" : " (0 for a dense model)");
    }
    snprintf(key, sizeof(key), "%s.expert_group_count", arch);
    rc = meta_range(ctx, path, key, 0, n_expert > 1 ? n_expert - 1 : 0, 0, &n_groups);
    snprintf(key, sizeof(key), "%s.expert_group_used_count", arch);
    rc = rc == PYMOE_OK ? meta_range(ctx, path, key, 0, MAX_EXPERTS, 0, &n_group_used) : rc;
    if (rc == PYMOE_OK && n_groups > 1 && (n_expert % n_groups != 0 || n_group_used < 1 || n_group_used >= n_groups)) {
        rc = pymoe_fail(PYMOE_EFORMAT, "'%s': %" PRId64 " experts in %" PRId64 " groups, %" PRId64 " used: the groups "
                        "must divide the experts and fewer than all of them be used", path, n_expert, n_groups,
                        n_group_used);
    }
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    int64_t id = gguf_find_key(ctx, key);
    if (rc == PYMOE_OK && id >= 0) {
        const char * t = gguf_get_kv_type(ctx, id) == GGUF_TYPE_STRING ? gguf_get_val_str(ctx, id) : "";
        if (strcmp(t, "none") != 0 && strcmp(t, "linear") != 0 && strcmp(t, "yarn") != 0 &&
            strcmp(t, "longrope") != 0) {
            rc = pymoe_fail(PYMOE_EFORMAT, "'%s': metadata %s is not one of none, linear, yarn, longrope", path, key);
        }
    }
    return rc;
}

static int32_t read_info(pymoe_gguf * g, const char * path) {
    const struct gguf_context * ctx = g->parts[0];
    int64_t id = gguf_find_key(ctx, "general.architecture");
    if (id >= 0 && gguf_get_kv_type(ctx, id) != GGUF_TYPE_STRING) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s': metadata general.architecture is a %s, not a string", path,
                          gguf_type_name(gguf_get_kv_type(ctx, id)));
    }
    const char * arch = id >= 0 ? gguf_get_val_str(ctx, id) : "";
    if (strlen(arch) >= sizeof(g->info.arch)) {
        return pymoe_fail(PYMOE_EFORMAT, "'%s': general.architecture '%.40s' is not an architecture name", path, arch);
    }
    snprintf(g->info.arch, sizeof(g->info.arch), "%s", arch);
    char    key[160];
    int64_t n_layers = 0;
    snprintf(key, sizeof(key), "%s.block_count", arch);
    int32_t rc = meta_range(ctx, path, key, 1, MAX_LAYERS, 0, &n_layers);  /* absent: a file without layers */
    if (rc != PYMOE_OK) {
        return rc;
    }
    g->info.n_layers = (int32_t) n_layers;
    int64_t n_nextn  = 0;
    snprintf(key, sizeof(key), "%s.nextn_predict_layers", arch);
    rc = meta_range(ctx, path, key, 0, n_layers, 0, &n_nextn);
    if (rc != PYMOE_OK) {
        return rc;
    }
    g->info.n_nextn = (int32_t) n_nextn;
    rc              = check_llama_limits(ctx, path, arch, (int32_t) n_layers);
    if (rc != PYMOE_OK) {
        return rc;
    }
    int64_t n_experts = 0;
    snprintf(key, sizeof(key), "%s.expert_count", arch);
    rc = meta_range(ctx, path, key, 0, MAX_EXPERTS, 0, &n_experts);  /* checked above: cannot fail */
    if (rc != PYMOE_OK) {
        return rc;
    }
    g->info.n_experts = (int32_t) n_experts;
    id = gguf_find_key(ctx, "tokenizer.ggml.tokens");
    if (id >= 0 && gguf_get_kv_type(ctx, id) == GGUF_TYPE_ARRAY && gguf_get_arr_n(ctx, id) <= INT32_MAX) {
        g->info.n_vocab = (int32_t) gguf_get_arr_n(ctx, id);
    }
    return read_layers(g, path);
}

int32_t pymoe_gguf_open(const char * path, pymoe_gguf ** out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_gguf_open: out is NULL");
    }
    *out = NULL;
    if (!path || !path[0]) {
        return pymoe_fail(PYMOE_EINVAL, "no model path given");
    }
    pymoe_init();  /* gguf logs through ggml's log, which our hook routes */
    pymoe_gguf * g = calloc(1, sizeof(*g));
    if (!g) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t rc = read_part(g, path);
    rc         = rc == PYMOE_OK ? read_other_parts(g, path) : rc;
    rc         = rc == PYMOE_OK ? read_info(g, path) : rc;
    if (rc != PYMOE_OK) {
        pymoe_gguf_free(g);
        return rc;
    }
    g->info.n_parts   = g->n_parts;
    g->info.n_tensors = g->n_tensors;
    *out              = g;
    return pymoe_ok();
}

void pymoe_gguf_free(pymoe_gguf * g) {
    if (!g) {
        return;
    }
    for (int32_t i = 0; i < g->n_parts; i++) {
        gguf_free(g->parts[i]);
    }
    free(g->tensors);
    free(g->layers);
    free(g);
}

int32_t pymoe_gguf_get_info(const pymoe_gguf * g, struct pymoe_gguf_info * out) {
    if (!g || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_gguf_get_info: NULL argument");
    }
    *out = g->info;
    return pymoe_ok();
}

int32_t pymoe_gguf_tensor(const pymoe_gguf * g, int32_t i, const char ** name, uint64_t * n_bytes) {
    if (!g || !name || !n_bytes || i < 0 || i >= g->n_tensors) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_gguf_tensor: no tensor %d (the file has %d)", i, g ? g->n_tensors : 0);
    }
    *name    = g->tensors[i].name;
    *n_bytes = g->tensors[i].n_bytes;
    return pymoe_ok();
}

int32_t pymoe_gguf_layer(const pymoe_gguf * g, int32_t il, struct pymoe_gguf_layer * out) {
    if (!g || !out || il < 0 || il >= g->info.n_layers) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_gguf_layer: no layer %d (the model has %d)", il,
                          g ? g->info.n_layers : 0);
    }
    *out = g->layers[il];
    return pymoe_ok();
}

const struct pymoe_tensor_size * pymoe_gguf_tensors(const pymoe_gguf * g, int32_t * n) {
    *n = g->n_tensors;
    return g->tensors;
}
