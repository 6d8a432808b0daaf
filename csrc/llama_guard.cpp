/* llama_guard.cpp - llama.cpp calls that read what a GGUF file holds, made
 * safe for files pymoe cannot fully check in advance.
 *
 * llama.cpp ends the process (GGML_ASSERT, GGML_ABORT) on some malformed
 * hyperparameters and vocabularies, and its text functions can throw. While
 * a thread is inside one of these calls, ggml's abort hook throws instead,
 * and the call returns a typed error (PYMOE_EFORMAT) with llama.cpp's message.
 * In a load (and the context's creation) llama.cpp catches the exception
 * itself, frees what it built and returns NULL. Asserts anywhere else (a
 * decode, whose graph runs on a thread pool; another thread) still end the
 * process, as they do without pymoe: those states cannot be unwound safely.
 * gguf_file.c refuses the malformed values it knows about first, with a
 * clearer message. */
#include "internal.h"

#include "ggml.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>

/* ggml's own report of an abort (not in its public headers: weak, so a llama.cpp without it still links) */
extern "C" __attribute__((weak)) void ggml_print_backtrace(void);

namespace {

thread_local int guard_depth = 0;  /* > 0: this thread is inside a guarded call */

struct assertion_failed : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void on_abort(const char * message) {
    if (guard_depth > 0) {
        throw assertion_failed(message);  /* unwinds to the guard (or to llama.cpp's own catch in a load) */
    }
    if (std::strstr(message, "ggml-rpc")) {
        pymoe_rpc_lost(message);  /* ggml's RPC thread lost its server: parked there, the process goes on */
    }
    std::fprintf(stderr, "%s\n", message);  /* what ggml prints without the hook; it aborts next */
    if (ggml_print_backtrace) {
        ggml_print_backtrace();
    }
}

template <typename F> int32_t guarded(const char * what, F call) {
    guard_depth++;
    try {
        call();
        guard_depth--;
        return PYMOE_OK;
    } catch (const std::exception & e) {
        guard_depth--;
        return pymoe_fail(PYMOE_EFORMAT, "llama.cpp failed in %s on this model's data: %s", what, e.what());
    }
}

}  // namespace

extern "C" {

void pymoe_guard_install(void) { ggml_set_abort_callback(on_abort); }

struct llama_model * pymoe_guarded_model_load(const char * path, struct llama_model_params params) {
    struct llama_model * model = nullptr;
    /* llama.cpp catches the assertion as an exception, logs it as the load's error and returns NULL */
    int32_t rc = guarded("loading", [&] { model = llama_model_load_from_file(path, params); });
    return rc == PYMOE_OK ? model : nullptr;
}

struct llama_context * pymoe_guarded_init_context(struct llama_model * model, struct llama_context_params params) {
    struct llama_context * ctx = nullptr;
    /* likewise: llama.cpp catches it around building the context (its graphs are built to reserve memory) */
    int32_t rc = guarded("creating a context", [&] { ctx = llama_init_from_model(model, params); });
    return rc == PYMOE_OK ? ctx : nullptr;
}

int32_t pymoe_guarded_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                               llama_token * out, int32_t capacity, bool add_special, bool parse_special,
                               int32_t * n) {
    return guarded("tokenize",
                   [&] { *n = llama_tokenize(vocab, text, text_len, out, capacity, add_special, parse_special); });
}

int32_t pymoe_guarded_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                                 char * out, int32_t capacity, bool render_special, int32_t * n) {
    return guarded("detokenize",
                   [&] { *n = llama_detokenize(vocab, tokens, n_tokens, out, capacity, false, render_special); });
}

int32_t pymoe_guarded_token_piece(const struct llama_vocab * vocab, llama_token token, char * out,
                                  int32_t capacity, bool render_special, int32_t * n) {
    return guarded("token_to_piece",
                   [&] { *n = llama_token_to_piece(vocab, token, out, capacity, 0, render_special); });
}

int32_t pymoe_guarded_rpc_add_server(void * add_server, const char * endpoint, void ** reg) {
    auto add = reinterpret_cast<void * (*) (const char *)>(add_server);
    guard_depth++;
    try {
        *reg = add(endpoint);
        guard_depth--;
        return PYMOE_OK;
    } catch (const std::exception & e) {
        guard_depth--;
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp could not connect to the rpc-server at %s: %s", endpoint,
                          e.what());
    }
}

int32_t pymoe_guarded_run(const char * what, void (*fn)(void *), void * data) {
    return guarded(what, [&] { fn(data); });
}

int32_t pymoe_guarded_chat_template(const char * tmpl, const struct llama_chat_message * chat, size_t n,
                                    bool add_assistant, char * out, int32_t capacity, int32_t * n_out) {
    return guarded("the chat template",
                   [&] { *n_out = llama_chat_apply_template(tmpl, chat, n, add_assistant, out, capacity); });
}

}  // extern "C"
