/* memory.c - the pre-check: what a load would put where, what this process
 * may lock and allocate, and whether the load can succeed. Reads GGUF
 * metadata only; allocates no weights. */
#include "internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

enum { CAP_IPC_LOCK_BIT = 14 };

/* A "Key:  value" line of /proc/self/status or /proc/meminfo, as text. */
static bool proc_field(const char * file, const char * key, char * value, size_t size) {
    FILE * f = fopen(file, "r");
    if (!f) {
        return false;
    }
    char   line[256];
    size_t klen  = strlen(key);
    bool   found = false;
    while (!found && fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            snprintf(value, size, "%s", line + klen + 1);
            found = true;
        }
    }
    fclose(f);
    return found;
}

static uint64_t proc_kib(const char * file, const char * key) {
    char value[128];
    return proc_field(file, key, value, sizeof(value)) ? strtoull(value, NULL, 10) * 1024 : 0;
}

uint64_t pymoe_locked_bytes_now(void) { return proc_kib("/proc/self/status", "VmLck"); }

uint64_t pymoe_mem_available(void) { return proc_kib("/proc/meminfo", "MemAvailable"); }

static uint64_t rlim_bytes(rlim_t v) { return v == RLIM_INFINITY ? UINT64_MAX : (uint64_t) v; }

int32_t pymoe_memory_facts_read(struct pymoe_memory_facts * out) {
    if (!out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_memory_facts_read: out is NULL");
    }
    memset(out, 0, sizeof(*out));
    struct rlimit lim;
    if (getrlimit(RLIMIT_MEMLOCK, &lim) == 0) {
        if (lim.rlim_cur != lim.rlim_max) {  /* the soft limit may be raised to the hard one without privilege */
            struct rlimit raised = { lim.rlim_max, lim.rlim_max };
            if (setrlimit(RLIMIT_MEMLOCK, &raised) == 0) {
                lim = raised;
            }
        }
        out->memlock_limit = rlim_bytes(lim.rlim_cur);
        out->memlock_hard  = rlim_bytes(lim.rlim_max);
    }
    char caps[64];
    if (proc_field("/proc/self/status", "CapEff", caps, sizeof(caps))) {
        out->cap_ipc_lock = (strtoull(caps, NULL, 16) >> CAP_IPC_LOCK_BIT) & 1;
    }
    out->mem_available = pymoe_mem_available();
    out->locked_now    = pymoe_locked_bytes_now();
    return pymoe_ok();
}

static double mib(uint64_t bytes) { return (double) bytes / (1024.0 * 1024.0); }

/* Locking host_bytes more succeeds when the limit does not bind or leaves room. */
static bool can_lock(const struct pymoe_memory_facts * f, uint64_t bytes) {
    return f->cap_ipc_lock || f->memlock_limit == UINT64_MAX ||
           (f->memlock_limit >= f->locked_now && f->memlock_limit - f->locked_now >= bytes);
}

/* plan->problem: why the load cannot go as asked, with the numbers and the remedy. */
static void explain(struct pymoe_memory_plan * plan, bool wants_lock) {
    const struct pymoe_memory_facts * f = &plan->facts;
    char * msg = plan->problem;
    size_t cap = sizeof(plan->problem);
    if (!plan->fits) {
        if (f->mem_available && plan->host_bytes > f->mem_available) {
            snprintf(msg, cap,
                     "the weights kept in RAM need %.1f MiB but only %.1f MiB is available (MemAvailable); keep fewer "
                     "layers on the CPU (n_gpu_layers, n_cpu_moe), free memory, or load with mmap",
                     mib(plan->host_bytes), mib(f->mem_available));
            return;
        }
        for (int32_t d = 1; d < plan->placement.n_devices; d++) {
            if (plan->device_free[d] && plan->placement.bytes[d] > plan->device_free[d]) {
                snprintf(msg, cap,
                         "device %s would hold %.1f MiB of weights but reports %.1f MiB free; offload fewer layers "
                         "(n_gpu_layers) or keep experts in RAM (n_cpu_moe)",
                         plan->device_names[d], mib(plan->placement.bytes[d]), mib(plan->device_free[d]));
                return;
            }
        }
    }
    if (wants_lock && !plan->lockable) {
        snprintf(msg, cap,
                 "locking %.1f MiB of weights needs RLIMIT_MEMLOCK of at least %.1f MiB, but it is %.1f MiB "
                 "(hard limit %.1f MiB) and the process lacks CAP_IPC_LOCK; raise it (`ulimit -l unlimited` as "
                 "root, LimitMEMLOCK=infinity in a systemd unit, memlock in /etc/security/limits.conf) or load "
                 "with load_mode no-mmap (--load no-mmap)",
                 mib(plan->host_bytes), mib(plan->host_bytes + f->locked_now), mib(f->memlock_limit),
                 f->memlock_hard == UINT64_MAX ? -1.0 : mib(f->memlock_hard));
    }
}

int32_t pymoe_memory_judge(struct pymoe_memory_plan * plan, int32_t load_mode) {
    if (!plan || load_mode < PYMOE_LOAD_MMAP || load_mode > PYMOE_LOAD_AUTO || plan->placement.n_devices < 1 ||
        plan->placement.n_devices > PYMOE_MAX_DEVICES) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_memory_judge: invalid plan or load mode");
    }
    const struct pymoe_memory_facts * f = &plan->facts;
    plan->problem[0] = '\0';
    plan->host_bytes = load_mode == PYMOE_LOAD_MMAP ? 0 : plan->placement.bytes[0];  /* mmap: the page cache */
    plan->lockable   = can_lock(f, plan->host_bytes);
    plan->fits       = !(f->mem_available && plan->host_bytes > f->mem_available);
    for (int32_t d = 1; d < plan->placement.n_devices; d++) {
        plan->fits = plan->fits && !(plan->device_free[d] && plan->placement.bytes[d] > plan->device_free[d]);
    }
    bool lock_pays  = plan->lockable && !plan->repacks;
    plan->load_mode = load_mode != PYMOE_LOAD_AUTO ? load_mode : lock_pays ? PYMOE_LOAD_MLOCK : PYMOE_LOAD_NO_MMAP;
    explain(plan, load_mode == PYMOE_LOAD_MLOCK || load_mode == PYMOE_LOAD_AUTO);
    if (!plan->problem[0] && load_mode == PYMOE_LOAD_AUTO && plan->repacks && plan->host_bytes > 0) {
        snprintf(plan->problem, sizeof(plan->problem),
                 "locking would turn off llama.cpp's repacked CPU kernels for this model's weight types (about 2x "
                 "slower decoding on CPU-only builds); load_mode mlock locks anyway");
    }
    return pymoe_ok();
}

int32_t pymoe_memory_precheck(const struct pymoe_model_params * params, struct pymoe_memory_plan * out,
                              struct pymoe_devices * devices, uint64_t * kv_elements) {
    memset(out, 0, sizeof(*out));
    if (params->load_mode < PYMOE_LOAD_MMAP || params->load_mode > PYMOE_LOAD_AUTO) {
        return pymoe_fail(PYMOE_EINVAL, "unknown load mode %d (expected mmap, no-mmap, mlock or auto)",
                          params->load_mode);
    }
    if (params->n_cpu_moe < 0 || params->n_overrides < 0 || (params->n_overrides > 0 && !params->overrides)) {
        return pymoe_fail(PYMOE_EINVAL, "n_cpu_moe and n_overrides must be >= 0 (got %d, %d)", params->n_cpu_moe,
                          params->n_overrides);
    }
    if (params->moe_cache_mib < 0 || params->moe_cache_uploads < 0) {
        return pymoe_fail(PYMOE_EINVAL, "moe_cache_mib and moe_cache_uploads must be >= 0 (got %d, %d)",
                          params->moe_cache_mib, params->moe_cache_uploads);
    }
    /* The header is read between resolving the devices and the load, and freed
     * before the load. Keep that order: where the weight buffers land depends on
     * it, and llama.cpp's mlock rounds a buffer's length up to whole pages from
     * an unaligned start, so it fails (ENOMEM) when the page after a buffer is
     * a thread stack's guard page. */
    pymoe_gguf * gguf = NULL;
    int32_t      rc   = pymoe_gguf_check_file(params->path);
    rc                = rc == PYMOE_OK ? pymoe_devices_resolve(params->rpc_servers, devices) : rc;
    rc                = rc == PYMOE_OK ? pymoe_gguf_open(params->path, &gguf) : rc;
    if (rc != PYMOE_OK) {
        return rc;
    }
    const char * names[PYMOE_MAX_DEVICES - 1];
    float        split[PYMOE_MAX_DEVICES - 1];
    snprintf(out->device_names[0], sizeof(out->device_names[0]), "CPU");
    for (int32_t d = 0; d < devices->n; d++) {
        names[d] = devices->names[d];
        split[d] = (float) devices->free[d];
        snprintf(out->device_names[d + 1], sizeof(out->device_names[d + 1]), "%s", devices->names[d]);
        out->device_free[d + 1] = devices->free[d];
    }
    struct pymoe_gguf_info info;
    pymoe_gguf_get_info(gguf, &info);
    rc = params->mtp ? pymoe_mtp_check(&info, params->path) : PYMOE_OK;
    if (rc != PYMOE_OK) {
        pymoe_gguf_free(gguf);
        return rc;
    }
    int32_t                          n_tensors = 0;
    const struct pymoe_tensor_size * tensors   = pymoe_gguf_tensors(gguf, &n_tensors);
    struct pymoe_placement_request   rq        = {
        .n_layers     = info.n_layers,
        .n_gpu_layers = params->n_gpu_layers,
        .n_cpu_moe    = params->n_cpu_moe,
        .overrides    = params->overrides,
        .n_overrides  = params->n_overrides,
        .n_devices    = devices->n,
        .device_names = names,
        .device_split = split,
        .n_unloaded_layers = params->mtp ? 0 : info.n_nextn,
    };
    rc = pymoe_place_tensors(&rq, tensors, n_tensors, NULL, &out->placement);
    /* the target's context: its trunk layers (an MTP head keeps a cache of its own) */
    for (int32_t il = 0; rc == PYMOE_OK && kv_elements && il < info.n_layers - info.n_nextn; il++) {
        struct pymoe_gguf_layer layer;
        pymoe_gguf_layer(gguf, il, &layer);
        kv_elements[0] += layer.kv_k_elements;
        kv_elements[1] += layer.kv_v_elements;
    }
    pymoe_gguf_free(gguf);  /* before anything else is allocated: the load comes next */
    if (rc != PYMOE_OK) {
        return rc;
    }
    pymoe_memory_facts_read(&out->facts);
    out->device_free[0] = out->facts.mem_available;
    /* with an expert cache nothing is repacked (llama_params.c): locking costs no speed */
    if (params->load_mode == PYMOE_LOAD_AUTO && out->placement.bytes[0] > 0 &&
        (params->moe_cache_mib == 0 || devices->n == 0)) {
        struct pymoe_llama_params * lp = malloc(sizeof(*lp));
        if (!lp) {
            return pymoe_fail(PYMOE_ENOMEM, "out of memory");
        }
        rc = pymoe_llama_params(params, devices, PYMOE_LOAD_NO_MMAP, lp);
        out->repacks = rc == PYMOE_OK && pymoe_repacking_would_be_used(params->path, lp->params);
        free(lp);
        if (rc != PYMOE_OK) {
            return rc;
        }
    }
    return pymoe_memory_judge(out, params->load_mode);
}

int32_t pymoe_memory_plan_for(const struct pymoe_model_params * params, struct pymoe_memory_plan * out) {
    if (!params || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_memory_plan_for: NULL argument");
    }
    struct pymoe_model_params local;
    int32_t                   rc = pymoe_model_params_in(params, &local);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct pymoe_devices devices;
    return pymoe_memory_precheck(&local, out, &devices, NULL);
}
