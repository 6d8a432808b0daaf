/* errors.c - status codes and the thread-local error detail. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

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

int32_t pymoe_ok(void) {
    last_error[0] = '\0';
    return PYMOE_OK;
}
