/* errors.c - status codes and the thread-local error detail. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

const char * pymoe_strerror(int32_t status) {
    switch (status) {
        case PYMOE_OK:           return "success";
        case PYMOE_EINVAL:       return "invalid argument";
        case PYMOE_ENOENT:       return "file not found or unreadable";
        case PYMOE_EFORMAT:      return "not a usable GGUF model";
        case PYMOE_ENOMEM:       return "out of memory";
        case PYMOE_ETOKEN:       return "token outside the vocabulary";
        case PYMOE_ECONTEXT:     return "context full";
        case PYMOE_ESTATE:       return "invalid in the current state";
        case PYMOE_EABORTED:     return "aborted";
        case PYMOE_EBACKEND:     return "llama.cpp error";
        case PYMOE_EUNSUPPORTED: return "not supported";
        case PYMOE_ENOSPACE:     return "output buffer too small";
        case PYMOE_ENUMERIC:     return "logits are not numbers";
        default:                 return "unknown status";
    }
}

const char * pymoe_last_error(void) { return last_error; }

int32_t pymoe_fail(int32_t status, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, args);
    va_end(args);
    return status;
}

int32_t pymoe_struct_out(void * out, void * full, size_t full_size, size_t min_size, const char * name) {
    uint32_t size;
    memcpy(&size, out, sizeof(size));
    if (size < min_size) {
        return pymoe_fail(PYMOE_EINVAL, "struct %s: its size field is %u; set it to sizeof(struct %s) before the "
                          "call", name, size, name);
    }
    const uint32_t n = size < full_size ? size : (uint32_t) full_size;
    memcpy(full, &n, sizeof(n));  /* what the caller gets: the bytes both know */
    memcpy(out, full, n);
    return PYMOE_OK;
}

void pymoe_struct_init(void * params, const void * full, size_t full_size, size_t size) {
    if (!params || size < sizeof(uint32_t)) {
        return;
    }
    const size_t n = size < full_size ? size : full_size;
    memcpy(params, full, n);
    if (size > n) {
        memset((char *) params + n, 0, size - n);
    }
    const uint32_t as_u32 = (uint32_t) size;
    memcpy(params, &as_u32, sizeof(as_u32));
}

int32_t pymoe_struct_in(const void * in, void * full, size_t full_size, size_t min_size, const char * name) {
    uint32_t size;
    memcpy(&size, in, sizeof(size));
    if (size < min_size || size > full_size + 4096) {  /* 4096: far past any release's growth, not a size */
        return pymoe_fail(PYMOE_EINVAL, "struct %s: its size field is %u; fill it with %s_default() first",
                          name, size, name);
    }
    for (size_t i = full_size; i < size; i++) {
        if (((const unsigned char *) in)[i] != 0) {
            return pymoe_fail(PYMOE_EINVAL, "struct %s: a field this library does not know is set (byte %zu of "
                              "the caller's %u; this library's struct has %zu): use a newer pymoe or leave it 0",
                              name, i, size, full_size);
        }
    }
    memcpy(full, in, size < full_size ? size : full_size);
    const uint32_t as_u32 = (uint32_t) full_size;
    memcpy(full, &as_u32, sizeof(as_u32));
    return PYMOE_OK;
}

int32_t pymoe_ok(void) {
    last_error[0] = '\0';
    return PYMOE_OK;
}
