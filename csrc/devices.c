/* devices.c - the offload devices of one load: rpc-server endpoints, then the
 * local GPUs, as ggml-backend devices with their names and free memory. */
#include "internal.h"

#include "ggml-backend.h"

#include <netdb.h>
#include <pthread.h>
#include <poll.h>
#include <fcntl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ggml's RPC client aborts the process when it cannot connect, so pymoe
 * checks first that something accepts connections at host:port. */
static int32_t probe_endpoint(const char * endpoint) {
    char host[256];
    const char * colon = strrchr(endpoint, ':');
    size_t       hlen  = colon ? (size_t) (colon - endpoint) : 0;
    char *       end   = NULL;
    long         port  = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || hlen == 0 || hlen >= sizeof(host) || !end || *end || port <= 0 || port > 65535) {
        return pymoe_fail(PYMOE_EINVAL, "RPC server '%s' is not of the form host:port", endpoint);
    }
    memcpy(host, endpoint, hlen);
    host[hlen] = '\0';
    struct addrinfo hints = { 0 }, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0 || !res) {
        return pymoe_fail(PYMOE_ENOENT, "RPC server '%s': cannot resolve host '%s'", endpoint, host);
    }
    int  fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    bool ok = false;
    if (fd >= 0) {
        fcntl(fd, F_SETFL, O_NONBLOCK);
        int rc = connect(fd, res->ai_addr, res->ai_addrlen);
        if (rc == 0) {
            ok = true;
        } else if (errno == EINPROGRESS) {
            struct pollfd p = { fd, POLLOUT, 0 };
            int           err = 0;
            socklen_t     len = sizeof(err);
            ok = poll(&p, 1, 3000) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
        }
        close(fd);
    }
    freeaddrinfo(res);
    if (!ok) {
        return pymoe_fail(PYMOE_ENOENT, "no rpc-server answers at %s (start one with: pymoe-rpc-server -H %s -p %ld)",
                          endpoint, host, port);
    }
    return PYMOE_OK;
}

typedef ggml_backend_reg_t (*rpc_add_server_fn)(const char * endpoint);

static int32_t add_rpc_devices(const char * servers, struct pymoe_devices * out) {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    rpc_add_server_fn  add = rpc ? (rpc_add_server_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server")
                                 : NULL;
    if (!add) {
        return pymoe_fail(PYMOE_EUNSUPPORTED, "this build of pymoe has no RPC backend (rpc_servers given)");
    }
    char * list = strdup(servers);
    if (!list) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t rc   = PYMOE_OK;
    char *  save = NULL;
    for (char * tok = strtok_r(list, ", ", &save); tok && rc == PYMOE_OK; tok = strtok_r(NULL, ", ", &save)) {
        rc = probe_endpoint(tok);
        if (rc != PYMOE_OK) {
            break;
        }
        ggml_backend_reg_t reg = add(tok);
        if (!reg) {
            rc = pymoe_fail(PYMOE_EBACKEND, "the rpc-server at %s reports no devices", tok);
            break;
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); i++) {
            if (out->n >= 15) {
                rc = pymoe_fail(PYMOE_EINVAL, "more than 15 offload devices");
                break;
            }
            out->dev[out->n++] = ggml_backend_reg_dev_get(reg, i);
        }
    }
    free(list);
    return rc;
}

/* A backend that only runs on a GPU: CUDA, Vulkan, Metal, ... (not the CPU's, RPC or BLAS). */
static bool is_gpu_backend(ggml_backend_reg_t reg) {
    const char * name = ggml_backend_reg_name(reg);
    return strcmp(name, "CPU") && strcmp(name, "RPC") && strcmp(name, "BLAS");
}

/* Why a GPU backend has no devices: the error it logged while registering,
 * without its function-name prefix. */
static const char * gpu_missing_reason(void) {
    const char * why = pymoe_backend_init_error();
    const char * colon = strstr(why, ": ");
    return why[0] ? (colon ? colon + 2 : why) : "no device found";
}

static pthread_once_t gpu_note_once = PTHREAD_ONCE_INIT;

static void note_missing_gpu(void) {
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(i);
        if (is_gpu_backend(reg) && ggml_backend_reg_dev_count(reg) == 0) {
            pymoe_log(PYMOE_LOG_WARN, "this pymoe build has %s but found no usable GPU (%s): running on the CPU",
                      ggml_backend_reg_name(reg), gpu_missing_reason());
        }
    }
}

void pymoe_note_missing_gpu(void) { pthread_once(&gpu_note_once, note_missing_gpu); }

int32_t pymoe_build_info(char * buf, size_t size) {
    pymoe_init();
    if (!buf || size == 0) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_build_info: no buffer");
    }
    size_t n = (size_t) snprintf(buf, size, "backends:");
    for (size_t i = 0; i < ggml_backend_reg_count() && n < size; i++) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(i);
        n += (size_t) snprintf(buf + n, size - n, "%s %s", i ? "," : "", ggml_backend_reg_name(reg));
        if (n < size && is_gpu_backend(reg) && ggml_backend_reg_dev_count(reg) == 0) {
            n += (size_t) snprintf(buf + n, size - n, " (no usable GPU: %s)", gpu_missing_reason());
        }
    }
    bool any = false;
    for (size_t i = 0; i < ggml_backend_dev_count() && n < size; i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            continue;
        }
        size_t free_bytes = 0, total = 0;
        ggml_backend_dev_memory(dev, &free_bytes, &total);
        n += (size_t) snprintf(buf + n, size - n, "%s %s %s (%.1f GiB, %.1f GiB free)", any ? "," : "; devices:",
                               ggml_backend_dev_name(dev), ggml_backend_dev_description(dev),
                               (double) total / (1 << 30), (double) free_bytes / (1 << 30));
        any = true;
    }
    if (!any && n < size) {
        snprintf(buf + n, size - n, "; devices: CPU only");
    }
    return pymoe_ok();
}

int32_t pymoe_devices_resolve(const char * rpc_servers, struct pymoe_devices * out) {
    memset(out, 0, sizeof(*out));
    pymoe_init();
    if (rpc_servers && rpc_servers[0]) {
        int32_t rc = add_rpc_devices(rpc_servers, out);
        if (rc != PYMOE_OK) {
            return rc;
        }
    }
    /* local GPUs as llama.cpp picks them by default: discrete ones, else integrated ones */
    int32_t first_local = out->n;
    for (int pass = 0; pass < 2 && out->n == first_local; pass++) {
        enum ggml_backend_dev_type want = pass == 0 ? GGML_BACKEND_DEVICE_TYPE_GPU : GGML_BACKEND_DEVICE_TYPE_IGPU;
        for (size_t i = 0; i < ggml_backend_dev_count() && out->n < 15; i++) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) == want && strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC")) {
                out->dev[out->n++] = dev;
            }
        }
    }
    for (int32_t d = 0; d < out->n; d++) {
        size_t free_bytes = 0, total = 0;
        ggml_backend_dev_memory(out->dev[d], &free_bytes, &total);
        snprintf(out->names[d], sizeof(out->names[d]), "%s", ggml_backend_dev_name(out->dev[d]));
        out->free[d] = free_bytes;
    }
    out->dev[out->n] = NULL;  /* llama_model_params.devices is NULL-terminated */
    return PYMOE_OK;
}
