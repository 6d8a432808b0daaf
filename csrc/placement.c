/* placement.c - which device each weight tensor goes to, and the bytes per
 * device: a pure function of tensor names and sizes and the requested
 * placement. It mirrors llama.cpp's rule (src/llama-model.cpp load_tensors and
 * the loader's buffer type choice) so that memory can be checked and planned
 * before anything is loaded. */
#include "internal.h"

#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum { BUFFER_ALIGNMENT = 32 };  /* ggml's tensor alignment inside CPU (and RPC-over-CPU) buffers */

/* Layer index of "blk.<i>.<rest>", or -1 for the input and output tensors. */
static int32_t layer_of(const char * name) {
    if (strncmp(name, "blk.", 4) != 0) {
        return -1;
    }
    char * end = NULL;
    long   il  = strtol(name + 4, &end, 10);
    return (end != name + 4 && *end == '.' && il >= 0) ? (int32_t) il : -1;
}

static bool is_input_tensor(const char * name) {
    static const char * const prefixes[] = { "token_embd.", "position_embd.", "token_types.", "per_layer_token_embd." };
    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++) {
        if (strncmp(name, prefixes[i], strlen(prefixes[i])) == 0) {
            return true;
        }
    }
    return false;
}

/* Routed experts: blk.<i>.ffn_{up,down,gate,gate_up}_exps and the _chexps
 * variants (weights, biases, scales). Shared experts (_shexp) are not. */
bool pymoe_is_routed_expert(const char * name) {
    const char * rest = strstr(name, ".ffn_");
    if (layer_of(name) < 0 || !rest) {
        return false;
    }
    rest += 5;
    static const char * const kinds[] = { "gate_up_", "up_", "down_", "gate_" };
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        size_t n = strlen(kinds[i]);
        if (strncmp(rest, kinds[i], n) == 0) {
            const char * suffix = rest + n;
            return strncmp(suffix, "exps", 4) == 0 || strncmp(suffix, "chexps", 6) == 0;
        }
    }
    return false;
}

void pymoe_cpu_moe_pattern(int32_t n_cpu_moe, char * out, size_t size) {
    size_t len = (size_t) snprintf(out, size, "^blk\\.(");
    for (int32_t il = 0; il < n_cpu_moe && len + 64 < size; il++) {
        len += (size_t) snprintf(out + len, size - len, il ? "|%d" : "%d", il);
    }
    snprintf(out + len, size - len, ")\\.ffn_(up|down|gate|gate_up)_(ch)?exps");
}

/* Device of layer il (il == n_layers: the output layer), as llama.cpp spreads
 * the last n_gpu_layers "layers" (output included) over the offload devices. */
static int32_t layer_device(const struct pymoe_placement_request * rq, const float * split_points, int32_t il) {
    int32_t n_gpu = rq->n_gpu_layers < 0 ? rq->n_layers + 1 : rq->n_gpu_layers;
    int32_t start = rq->n_layers + 1 - n_gpu;
    start         = start < 0 ? 0 : start;
    int32_t act   = n_gpu < rq->n_layers + 1 ? n_gpu : rq->n_layers + 1;
    if (rq->n_devices == 0 || il < start || il - start >= act) {
        return 0;
    }
    float x = (float) (il - start) / (float) act;
    for (int32_t d = 0; d < rq->n_devices; d++) {  /* upper_bound over the cumulative split */
        if (split_points[d] > x) {
            return d + 1;
        }
    }
    return rq->n_devices;
}

static int32_t device_index(const struct pymoe_placement_request * rq, const char * name) {
    if (strcasecmp(name, "CPU") == 0) {
        return 0;
    }
    for (int32_t d = 0; d < rq->n_devices; d++) {
        if (rq->device_names && rq->device_names[d] && strcasecmp(name, rq->device_names[d]) == 0) {
            return d + 1;
        }
    }
    return -1;
}

static int32_t unknown_device(const struct pymoe_placement_request * rq, const char * name) {
    char   known[512] = "CPU";
    size_t len        = strlen(known);
    for (int32_t d = 0; d < rq->n_devices && rq->device_names; d++) {
        len += (size_t) snprintf(known + len, len < sizeof(known) ? sizeof(known) - len : 0, ", %s",
                                 rq->device_names[d] ? rq->device_names[d] : "?");
    }
    return pymoe_fail(PYMOE_EINVAL, "override names device '%s', which is not one of this load's devices (%s)", name,
                      known);
}

/* One compiled rule: tensors matching re go to device. */
struct rule {
    regex_t re;
    int32_t device;
};

static int32_t compile_rules(const struct pymoe_placement_request * rq, struct rule ** out, int32_t * n_out) {
    int32_t n_rules = (rq->n_cpu_moe > 0 ? 1 : 0) + rq->n_overrides;
    *out            = NULL;
    *n_out          = 0;
    if (n_rules == 0) {
        return PYMOE_OK;
    }
    struct rule * rules = calloc((size_t) n_rules, sizeof(*rules));
    if (!rules) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t n = 0;
    int32_t rc = PYMOE_OK;
    if (rq->n_cpu_moe > 0) {  /* one pattern for "routed experts of layers 0..N-1" */
        char * pattern = malloc(PYMOE_CPU_MOE_PATTERN_SIZE);
        if (!pattern) {
            free(rules);
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        pymoe_cpu_moe_pattern(rq->n_cpu_moe, pattern, PYMOE_CPU_MOE_PATTERN_SIZE);
        int err = regcomp(&rules[n].re, pattern, REG_EXTENDED | REG_NOSUB);
        free(pattern);
        if (err) {
            free(rules);
            return pymoe_fail(PYMOE_EINVAL, "n_cpu_moe %d is too large to express", rq->n_cpu_moe);
        }
        rules[n++].device = 0;
    }
    for (int32_t i = 0; i < rq->n_overrides && rc == PYMOE_OK; i++) {
        const struct pymoe_tensor_override * o = &rq->overrides[i];
        if (!o->pattern || !o->pattern[0] || !o->device) {
            rc = pymoe_fail(PYMOE_EINVAL, "override %d needs a pattern and a device", i);
            break;
        }
        int32_t dev = device_index(rq, o->device);
        if (dev < 0) {
            rc = unknown_device(rq, o->device);
            break;
        }
        int err = regcomp(&rules[n].re, o->pattern, REG_EXTENDED | REG_NOSUB);
        if (err) {
            char why[128];
            regerror(err, &rules[n].re, why, sizeof(why));
            rc = pymoe_fail(PYMOE_EINVAL, "override pattern '%s' is not a valid POSIX extended regex: %s",
                            o->pattern, why);
            break;
        }
        rules[n++].device = dev;
    }
    if (rc != PYMOE_OK) {
        for (int32_t i = 0; i < n; i++) {
            regfree(&rules[i].re);
        }
        free(rules);
        return rc;
    }
    *out   = rules;
    *n_out = n;
    return PYMOE_OK;
}

static uint64_t padded(uint64_t n) { return (n + BUFFER_ALIGNMENT - 1) / BUFFER_ALIGNMENT * BUFFER_ALIGNMENT; }

int32_t pymoe_place_tensors(const struct pymoe_placement_request * rq, const struct pymoe_tensor_size * tensors,
                            int32_t n_tensors, int32_t * device_of, struct pymoe_placement * out) {
    if (!rq || !out || n_tensors < 0 || (n_tensors > 0 && !tensors)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_place_tensors: invalid arguments");
    }
    if (rq->n_layers < 0 || rq->n_layers > PYMOE_MAX_LAYERS || rq->n_unloaded_layers < 0 ||
        rq->n_unloaded_layers > rq->n_layers || rq->n_devices < 0 || rq->n_devices > PYMOE_MAX_DEVICES - 1 ||
        rq->n_cpu_moe < 0 || rq->n_overrides < 0 || (rq->n_overrides > 0 && !rq->overrides)) {
        return pymoe_fail(PYMOE_EINVAL,
                          "placement request out of range (n_layers %d of at most %d, n_devices %d of at most %d, "
                          "n_cpu_moe %d, n_overrides %d)", rq->n_layers, PYMOE_MAX_LAYERS, rq->n_devices,
                          PYMOE_MAX_DEVICES - 1, rq->n_cpu_moe, rq->n_overrides);
    }
    float split_points[PYMOE_MAX_DEVICES];
    float total = 0.0f;
    for (int32_t d = 0; d < rq->n_devices; d++) {
        float w = rq->device_split ? rq->device_split[d] : 1.0f;
        if (!(w >= 0.0f)) {
            return pymoe_fail(PYMOE_EINVAL, "device_split[%d] = %g is negative", d, (double) w);
        }
        total += w;
        split_points[d] = total;
    }
    for (int32_t d = 0; d < rq->n_devices; d++) {  /* all zero: equal shares, as llama.cpp does */
        split_points[d] = total > 0.0f ? split_points[d] / total : (float) (d + 1) / (float) rq->n_devices;
    }
    struct rule * rules   = NULL;
    int32_t       n_rules = 0;
    int32_t       rc      = compile_rules(rq, &rules, &n_rules);
    if (rc != PYMOE_OK) {
        return rc;
    }
    memset(out, 0, sizeof(*out));
    out->n_devices       = 1 + rq->n_devices;
    out->output_device   = layer_device(rq, split_points, rq->n_layers);
    out->first_gpu_layer = rq->n_layers;
    for (int32_t il = 0; il < rq->n_layers; il++) {
        if (layer_device(rq, split_points, il) != 0) {
            out->first_gpu_layer = il;
            break;
        }
    }
    const struct pymoe_tensor_size * token_embd = NULL;
    int32_t                          embd_dev   = 0;
    int32_t                          embd_rule  = -1;  /* the override that placed token_embd, if any */
    bool                             has_output = false;
    for (int32_t i = 0; i < n_tensors; i++) {
        const char * name = tensors[i].name ? tensors[i].name : "";
        int32_t      il   = layer_of(name);
        if (il >= rq->n_layers - rq->n_unloaded_layers && il >= 0) {
            if (device_of) {
                device_of[i] = -1;  /* not loaded */
            }
            continue;
        }
        int32_t      dev  = il >= 0              ? layer_device(rq, split_points, il < rq->n_layers ? il : rq->n_layers - 1)
                            : is_input_tensor(name) ? 0
                                                    : out->output_device;
        int32_t rule = -1;
        for (int32_t r = 0; r < n_rules && rule < 0; r++) {
            rule = regexec(&rules[r].re, name, 0, NULL, 0) == 0 ? r : -1;
        }
        dev = rule >= 0 ? rules[rule].device : dev;
        out->bytes[dev] += padded(tensors[i].n_bytes);
        if (pymoe_is_routed_expert(name)) {
            out->expert_bytes[dev] += padded(tensors[i].n_bytes);
        }
        if (device_of) {
            device_of[i] = dev;
        }
        if (strcmp(name, "token_embd.weight") == 0) {
            token_embd = &tensors[i];
            embd_dev   = dev;
            embd_rule  = rule;
        }
        has_output = has_output || strcmp(name, "output.weight") == 0;
    }
    /* tied embeddings: llama.cpp loads token_embd.weight a second time as the
     * output matrix, on the output device (or where an override sends that
     * name), unless that is where the first copy already is */
    int32_t output_copy_dev = embd_rule >= 0 ? rules[embd_rule].device : out->output_device;
    if (!has_output && token_embd && output_copy_dev != embd_dev) {
        out->bytes[output_copy_dev] += padded(token_embd->n_bytes);
    }
    for (int32_t r = 0; r < n_rules; r++) {
        regfree(&rules[r].re);
    }
    free(rules);
    return pymoe_ok();
}
