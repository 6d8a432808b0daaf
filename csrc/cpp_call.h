/* cpp_call.h - a call into llama.cpp's C++ code from our C API (internal):
 * body() under the guard (llama_guard.cpp), so that an exception it throws
 * or an assert it trips is PYMOE_EINVAL naming what failed, never an abort
 * or an exception across the C boundary. */
#ifndef PYMOE_CPP_CALL_H
#define PYMOE_CPP_CALL_H

#include "internal.h"

#include <exception>
#include <string>

template <typename F> int32_t pymoe_cpp_call(const char * what, F body) {
    std::string error;
    auto run = [&] {
        try {
            body();
        } catch (const std::exception & e) {
            error = e.what();
        }
    };
    int32_t rc = pymoe_guarded_run(what, [](void * f) { (*static_cast<decltype(run) *>(f))(); }, &run);
    if (rc != PYMOE_OK) {
        return rc;
    }
    return error.empty() ? pymoe_ok() : pymoe_fail(PYMOE_EINVAL, "%s: %s", what, error.c_str());
}

#endif
