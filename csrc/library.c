/* library.c - what the whole library shares: start-up (the log hook before
 * llama.cpp's backends), one log callback for pymoe's own messages and
 * llama.cpp's, what this build can run on, versions, and the clock.
 *
 * llama.cpp logs in fragments (a line may arrive in several calls, progress
 * dots as "continue" fragments); we hand the callback whole lines. The hook
 * is always installed, so nothing reaches stderr, and it remembers the last
 * error line llama.cpp logged on each thread: that text becomes the detail of
 * the status code when a llama.cpp call then fails. */
#include "internal.h"

#include "ggml-backend.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static pymoe_log_fn     user_fn;
static void *           user_data;
static pthread_mutex_t  user_lock = PTHREAD_MUTEX_INITIALIZER;

static _Thread_local char    line_buf[2048];  /* llama.cpp's current, unfinished line */
static _Thread_local size_t  line_len;
static _Thread_local int32_t line_level = PYMOE_LOG_INFO;
static _Thread_local char    llama_error[1024];
static char                  backend_error[256];  /* written once, during backend registration */
static _Thread_local pymoe_line_observer observer;  /* a load reading llama.cpp's buffer lines */
static _Thread_local void *  observer_data;

static void note_missing_gpu_once(void);

void pymoe_log_observe(pymoe_line_observer fn, void * data) {
    observer      = fn;
    observer_data = data;
}

void pymoe_log_set(pymoe_log_fn fn, void * data) {
    pymoe_init();
    pthread_mutex_lock(&user_lock);
    user_fn   = fn;
    user_data = data;
    pthread_mutex_unlock(&user_lock);
    if (fn) {
        note_missing_gpu_once();  /* the first callback hears it */
    }
}

static void emit(int32_t level, int32_t source, const char * line) {
    pthread_mutex_lock(&user_lock);
    pymoe_log_fn fn   = user_fn;
    void *       data = user_data;
    pthread_mutex_unlock(&user_lock);
    if (fn) {
        fn(level, source, line, data);
    }
}

void pymoe_log(int32_t level, const char * fmt, ...) {
    char    text[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(text, sizeof(text), fmt, args);
    va_end(args);
    emit(level, PYMOE_LOG_FROM_PYMOE, text);
}

static void flush_line(void) {
    line_buf[line_len] = '\0';
    if (line_level == PYMOE_LOG_ERROR) {  /* every error line since the last clear: the first says why */
        size_t used = strlen(llama_error);
        snprintf(llama_error + used, sizeof(llama_error) - used, "%s%.500s", used ? "; " : "", line_buf);
        if (!backend_error[0] && strstr(line_buf, "failed to initialize")) {
            snprintf(backend_error, sizeof(backend_error), "%.250s", line_buf);
        }
    }
    if (line_len > 0) {
        if (observer) {
            observer(line_level, line_buf, observer_data);
        }
        emit(line_level, PYMOE_LOG_FROM_LLAMA, line_buf);
    }
    line_len = 0;
}

static void llama_hook(enum ggml_log_level level, const char * text, void * data) {
    (void) data;
    if (level != GGML_LOG_LEVEL_CONT) {
        if (line_len > 0) {
            flush_line();  /* a new message begins: the previous one had no newline */
        }
        line_level = level == GGML_LOG_LEVEL_NONE ? PYMOE_LOG_INFO : (int32_t) level;
    }
    for (const char * c = text; *c; c++) {
        if (*c == '\n') {
            flush_line();
        } else if (line_len + 1 < sizeof(line_buf)) {
            line_buf[line_len++] = *c;
        }
    }
}

const char * pymoe_llama_last_error(void) { return llama_error; }

bool pymoe_llama_ran_out_of_memory(void) {
    /* ggml's and llama.cpp's allocation failures all say so: "failed to allocate", "alloc failed",
     * "unable to allocate" */
    return strstr(llama_error, "alloc") != NULL;
}

void pymoe_llama_clear_error(void) { llama_error[0] = '\0'; }


static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_library(void) {
    llama_log_set(llama_hook, NULL);  /* before llama_backend_init: it may log */
    pymoe_guard_install();
    llama_backend_init();
}

void pymoe_init(void) { pthread_once(&init_once, init_library); }

/* A backend that only runs on a GPU: CUDA, Vulkan, Metal, ... (not the CPU's, RPC or BLAS). */
static bool is_gpu_backend(ggml_backend_reg_t reg) {
    const char * name = ggml_backend_reg_name(reg);
    return strcmp(name, "CPU") && strcmp(name, "RPC") && strcmp(name, "BLAS");
}

/* Why a GPU backend has no devices: the error it logged while registering,
 * without its function-name prefix. */
static const char * gpu_missing_reason(void) {
    const char * why = backend_error;
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

/* A GPU build started where no GPU is usable runs on the CPU: say so once, in one warning line. */
static void note_missing_gpu_once(void) { pthread_once(&gpu_note_once, note_missing_gpu); }

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

const char * pymoe_version(void) { return "0.1.0"; }

const char * pymoe_llama_version(void) { return llama_version(); }

double pymoe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}
