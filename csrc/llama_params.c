/* llama_params.c - a pymoe load request as llama.cpp's model params: the
 * devices, n_cpu_moe and the overrides as buffer type overrides, the load
 * mode; and a dry run that asks llama.cpp which buffer types it would use. */
#include "internal.h"

#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int32_t pymoe_llama_params(const struct pymoe_model_params * params, struct pymoe_devices * devices,
                           int32_t load_mode, struct pymoe_llama_params * out) {
    memset(out, 0, sizeof(*out));
    if (params->n_overrides > PYMOE_MAX_OVERRIDES) {
        return pymoe_fail(PYMOE_EINVAL, "at most %d overrides (got %d)", PYMOE_MAX_OVERRIDES, params->n_overrides);
    }
    int32_t n = 0;
    if (params->n_cpu_moe > 0) {
        pymoe_cpu_moe_pattern(params->n_cpu_moe, out->cpu_moe_pattern, sizeof(out->cpu_moe_pattern));
        out->overrides[n].pattern = out->cpu_moe_pattern;
        out->overrides[n++].buft  = ggml_backend_cpu_buffer_type();
    }
    for (int32_t i = 0; i < params->n_overrides; i++) {
        const char *               dev  = params->overrides[i].device;
        ggml_backend_buffer_type_t buft = dev && strcasecmp(dev, "CPU") == 0 ? ggml_backend_cpu_buffer_type() : NULL;
        for (int32_t d = 0; dev && !buft && d < devices->n; d++) {
            if (strcasecmp(dev, devices->names[d]) == 0) {
                buft = ggml_backend_dev_buffer_type(devices->dev[d]);
            }
        }
        if (!buft) {  /* pymoe_place_tensors refuses it first, with the list of names */
            return pymoe_fail(PYMOE_EINVAL, "override %d names an unknown device", i);
        }
        out->overrides[n].pattern = params->overrides[i].pattern;
        out->overrides[n++].buft  = buft;
    }
    out->overrides[n].pattern = NULL;  /* terminator */

    struct llama_model_params * lp = &out->params;
    *lp                            = llama_model_default_params();
    lp->devices                    = devices->dev;
    lp->tensor_buft_overrides      = n > 0 ? out->overrides : NULL;
    lp->n_gpu_layers               = params->n_gpu_layers;
    lp->load_mtp                   = params->mtp;
    lp->load_mode                  = load_mode == PYMOE_LOAD_MMAP    ? LLAMA_LOAD_MODE_MMAP
                                     : load_mode == PYMOE_LOAD_MLOCK ? LLAMA_LOAD_MODE_MLOCK
                                                                     : LLAMA_LOAD_MODE_NONE;
    /* llama.cpp locks host buffers only, and its CPU "repack" buffers (Q4_0,
     * Q4_K, IQ4_NL, MXFP4, ... on AVX2) are not host buffers: in mlock mode
     * every weight stays in plain, locked CPU buffers */
    lp->use_extra_bufts = load_mode != PYMOE_LOAD_MLOCK;
    /* an expert cache copies host experts to a device byte for byte: their layout must be ggml's own (with no
     * offload device there can be no cache, and nothing to give up) */
    lp->use_extra_bufts = lp->use_extra_bufts && (params->moe_cache_mib == 0 || devices->n == 0);
    return PYMOE_OK;
}

bool pymoe_parse_buffer_line(const char * line, struct pymoe_buffer_size * out) {
    const char * pre = strstr(line, "load_tensors:");
    const char * tag = strstr(line, " model buffer size = ");
    if (!pre || !tag || tag < pre) {
        return false;
    }
    const char * name = pre + strlen("load_tensors:");
    while (*name == ' ') {
        name++;
    }
    snprintf(out->name, sizeof(out->name), "%.*s", (int) (tag - name), name);
    out->n_bytes = (uint64_t) (strtod(tag + strlen(" model buffer size = "), NULL) * 1048576.0 + 0.5);
    out->device  = -1;
    return true;
}

bool pymoe_is_host_buffer(const char * name) {
    size_t n = strlen(name);
    return strncmp(name, "CPU", 3) == 0 || (n > 5 && strcmp(name + n - 5, "_Host") == 0);
}

static void on_dry_run_line(int32_t level, const char * line, void * data) {
    bool *                   repack = data;
    struct pymoe_buffer_size b;
    /* a CPU buffer that llama.cpp does not call a host buffer: repacked weights */
    if (pymoe_parse_buffer_line(line, &b) && strncmp(b.name, "CPU_", 4) == 0 && strcmp(b.name, "CPU_Mapped") != 0) {
        *repack = true;
    }
    (void) level;
}

bool pymoe_repacking_would_be_used(const char * path, struct llama_model_params lp) {
    bool repack        = false;
    lp.no_alloc        = true;  /* metadata only: allocates and reads no weights */
    lp.use_extra_bufts = true;
    lp.load_mode       = LLAMA_LOAD_MODE_NONE;
    pymoe_log_observe(on_dry_run_line, &repack);
    struct llama_model * lm = pymoe_guarded_model_load(path, lp);
    pymoe_log_observe(NULL, NULL);
    llama_model_free(lm);
    return repack;
}
