/* devices.c - the offload devices of one load: rpc-server endpoints, then the
 * local GPUs, as ggml-backend devices with their names and free memory. */
#include "internal.h"

#include "ggml-backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
        int32_t version[3];
        rc = pymoe_rpc_handshake(tok, version);  /* ggml's client would end the process on a failure */
        if (rc != PYMOE_OK) {
            break;
        }
        ggml_backend_reg_t reg = NULL;
        rc = pymoe_guarded_rpc_add_server((void *) add, tok, (void **) &reg);
        if (rc == PYMOE_OK && !reg) {
            rc = pymoe_fail(PYMOE_EBACKEND, "the rpc-server at %s reports no devices", tok);
        }
        if (rc != PYMOE_OK) {
            break;
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); i++) {
            if (out->n >= PYMOE_MAX_DEVICES - 1) {
                rc = pymoe_fail(PYMOE_EINVAL, "more than %d offload devices", PYMOE_MAX_DEVICES - 1);
                break;
            }
            out->dev[out->n++] = ggml_backend_reg_dev_get(reg, i);
        }
    }
    free(list);
    return rc;
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
        for (size_t i = 0; i < ggml_backend_dev_count() && out->n < PYMOE_MAX_DEVICES - 1; i++) {
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
