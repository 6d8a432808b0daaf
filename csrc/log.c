/* log.c - one log callback for pymoe's own messages and llama.cpp's.
 *
 * llama.cpp logs in fragments (a line may arrive in several calls, progress
 * dots as "continue" fragments); we hand the callback whole lines. The hook
 * is always installed, so nothing reaches stderr, and it remembers the last
 * error line llama.cpp logged on each thread: that text becomes the detail of
 * the status code when a llama.cpp call then fails. */
#include "internal.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static pymoe_log_fn     user_fn;
static void *           user_data;
static pthread_mutex_t  user_lock = PTHREAD_MUTEX_INITIALIZER;

static _Thread_local char    line_buf[2048];  /* llama.cpp's current, unfinished line */
static _Thread_local size_t  line_len;
static _Thread_local int32_t line_level = PYMOE_LOG_INFO;
static _Thread_local char    llama_error[512];
static char                  backend_error[256];  /* written once, during backend registration */
static _Thread_local pymoe_line_observer observer;  /* a load reading llama.cpp's buffer lines */
static _Thread_local void *  observer_data;

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
        pymoe_note_missing_gpu();
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
    if (line_level == PYMOE_LOG_ERROR) {
        snprintf(llama_error, sizeof(llama_error), "%.500s", line_buf);
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

const char * pymoe_backend_init_error(void) { return backend_error; }

void pymoe_llama_clear_error(void) { llama_error[0] = '\0'; }

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void init_library(void) {
    llama_log_set(llama_hook, NULL);  /* before llama_backend_init: it may log */
    llama_backend_init();
}

void pymoe_init(void) { pthread_once(&init_once, init_library); }
