/*
 * pymoe.h - the one public header of libpymoe.
 *
 * libpymoe runs GGUF models through llama.cpp's C API and gives token-level
 * control: load a model, open a session (one context), feed tokens, read
 * logits, sample, rewind. It never prints and never exits: messages go to the
 * log callback (silent by default), failures come back as status codes.
 *
 * Conventions
 *   - Every fallible function returns int32_t: PYMOE_OK (0) or a negative
 *     PYMOE_E* code. On failure pymoe_last_error() (thread-local) says what
 *     happened in words, and outputs are left untouched unless stated.
 *   - Params structs are passed by pointer; fill them with *_default() first.
 *     They start with a size, which *_default() sets (a macro: it passes
 *     sizeof the caller's struct to *_init()). The library reads the fields
 *     the caller's struct has and takes the defaults for the rest; a field
 *     it does not know must be 0 (else PYMOE_EINVAL). So a program built
 *     against an older or a newer header keeps its meaning.
 *   - Result structs that grow from release to release start with a size:
 *     set it to sizeof the struct before the call (out.size = sizeof out).
 *     The library fills that many bytes and sets size to what it filled, so
 *     a program built against an older header gets the fields it knows, and
 *     one built against a newer header sees which fields this library has.
 *     A size of 0 (not set) is PYMOE_EINVAL.
 *   - Every *_create / *_load has its *_free. Free sessions before their model.
 *
 * Build a program against the installed package:
 *   cc prog.c $(python -m pymoe --cflags --libs)
 */
#ifndef PYMOE_H
#define PYMOE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(PYMOE_BUILD)
#    define PYMOE_API __declspec(dllexport)
#elif defined(_WIN32)
#    define PYMOE_API __declspec(dllimport)
#else
#    define PYMOE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* PYMOE_CDEF_BEGIN
 * Everything between the CDEF markers is also read by the Python binding
 * (cffi), so it holds no preprocessor directives; PYMOE_API is stripped. */

typedef int32_t pymoe_token;

typedef struct pymoe_model   pymoe_model;    /* weights + vocabulary, read-only once loaded */
typedef struct pymoe_session pymoe_session;  /* one llama.cpp context over a model: KV cache, logits */

/* ---- status codes -------------------------------------------------------- */

enum pymoe_status {
    PYMOE_OK           =   0,
    PYMOE_EINVAL       =  -1, /* an argument is invalid (NULL, out of range, inconsistent) */
    PYMOE_ENOENT       =  -2, /* a file does not exist or cannot be read */
    PYMOE_EFORMAT      =  -3, /* a file is not a usable GGUF model (bad magic, truncated, unknown arch) */
    PYMOE_ENOMEM       =  -4, /* memory could not be allocated (weights, KV cache, compute buffers) */
    PYMOE_ETOKEN       =  -5, /* a token id is outside the vocabulary */
    PYMOE_ECONTEXT     =  -6, /* the tokens do not fit in the session's context */
    PYMOE_ESTATE       =  -7, /* not valid in the current state (e.g. logits before any feed) */
    PYMOE_EABORTED     =  -8, /* stopped by a callback (progress returned false) */
    PYMOE_EBACKEND     =  -9, /* llama.cpp failed; pymoe_last_error() carries its message */
    PYMOE_EUNSUPPORTED = -10, /* not supported by this model or build */
    PYMOE_ENOSPACE     = -11, /* an output buffer is too small; the size needed is still returned */
    PYMOE_ENUMERIC     = -12  /* a model's logits are not numbers (NaN or infinite): corrupt weights, overflow */
};

/* Short fixed description of a status code ("invalid argument", ...). */
PYMOE_API const char * pymoe_strerror(int32_t status);

/* Detail of the last failure on this thread: what, which values, what to do.
 * Empty string when the last call on this thread succeeded. */
PYMOE_API const char * pymoe_last_error(void);

/* Version of libpymoe and of the llama.cpp it was built with. */
PYMOE_API const char * pymoe_version(void);
PYMOE_API const char * pymoe_llama_version(void);

/* One line on what this build can run on: its backends (a GPU backend with no
 * usable device says why, e.g. no driver) and the devices found. Truncated to
 * size; returns PYMOE_OK. */
PYMOE_API int32_t pymoe_build_info(char * buf, size_t size);

/* ---- logging ------------------------------------------------------------- */

enum pymoe_log_level {
    PYMOE_LOG_DEBUG = 1,
    PYMOE_LOG_INFO  = 2,
    PYMOE_LOG_WARN  = 3,
    PYMOE_LOG_ERROR = 4
};

enum pymoe_log_source {
    PYMOE_LOG_FROM_PYMOE = 0, /* our own messages: warnings a user should see */
    PYMOE_LOG_FROM_LLAMA = 1  /* llama.cpp / ggml diagnostics */
};

/* One complete line (no trailing newline) per call. May be called from any
 * thread that calls into the library. */
typedef void (*pymoe_log_fn)(int32_t level, int32_t source, const char * line, void * user_data);

/* Route every message to fn; NULL (the default) drops them all. The first
 * callback installed hears, once, if this is a GPU build with no usable GPU. */
PYMOE_API void pymoe_log_set(pymoe_log_fn fn, void * user_data);

/* ---- stopping long calls ----------------------------------------------------- */

/* Stop the loads, feeds and speculative rounds running now, in every thread:
 * each returns PYMOE_EABORTED at its next check (between graph nodes of a
 * decode, between tensors of a load; well under a second) and leaves its
 * session at the position it had before the call. Calls started afterwards
 * run normally. Async-signal-safe: a signal handler may call it. */
PYMOE_API void pymoe_interrupt(void);

/* Make Ctrl-C call pymoe_interrupt(), then the SIGINT handler installed now
 * (a language runtime's, which then does what it always did). Installs
 * nothing when SIGINT is ignored or has the default action, or when ours is
 * already first. Call it again before a long call if something may have
 * replaced the handler since (Python's signal.signal does). */
PYMOE_API int32_t pymoe_interrupt_on_sigint(void);

/* Asked between the graph nodes of a feed, on the thread running it (keep it
 * quick): true stops the feed with PYMOE_EABORTED, the session left where it was. */
typedef bool (*pymoe_abort_fn)(void * user_data);

/* A pymoe_abort_fn: true once the int32_t user_data points to is non-zero
 * (a flag another thread sets to stop a session's running feed). */
PYMOE_API bool pymoe_abort_when_set(void * flag);

/* ---- rpc-server endpoints ------------------------------------------------------ */

/* Speak the RPC protocol's handshake with endpoint ("host:port"), as a load
 * would, with timeouts: PYMOE_ENOENT when nothing listens there,
 * PYMOE_EBACKEND when what answers is not an rpc-server (it closes, answers
 * wrongly, or not within 5 s), PYMOE_EUNSUPPORTED for another protocol
 * version. version gets the server's (major, minor, patch); -1s when this
 * process is connected to it already (a server serves one client at a time). */
PYMOE_API int32_t pymoe_rpc_handshake(const char * endpoint, int32_t version[3]);

/* Loads give their connections to rpc-servers receive and send timeouts of
 * this many seconds (default 120; 0: none): a server that stops answering
 * for that long counts as lost. Applies to loads from now on. */
PYMOE_API void   pymoe_rpc_set_timeout(double seconds);
PYMOE_API double pymoe_rpc_timeout(void);

/* How many times llama.cpp's RPC client has lost a server (closed, killed,
 * answering garbage, or silent past the timeout), and the first such
 * message. A call that was waiting on that server never returns; the
 * process goes on. Run calls on models with rpc-servers on a thread of their
 * own and give up on them when this count moves (pymoe's Python layer does). */
PYMOE_API uint32_t     pymoe_rpc_failures(void);
PYMOE_API const char * pymoe_rpc_failure(void);

/* ---- model ----------------------------------------------------------------- */

enum pymoe_load_mode {
    PYMOE_LOAD_MMAP    = 0, /* map the file; pages are read lazily and may be evicted */
    PYMOE_LOAD_NO_MMAP = 1, /* read every weight into allocated memory up front */
    PYMOE_LOAD_MLOCK   = 2, /* no mmap, and every weight byte in host memory locked (never paged);
                               an error when the lock cannot cover them all */
    PYMOE_LOAD_AUTO    = 3  /* mlock when the pre-check says locking will succeed and costs no speed
                               (see pymoe_memory_plan.repacks), else no-mmap with one warning
                               saying why (the default) */
};

/* Load progress, fraction in [0, 1]. Return false to abort the load. */
typedef bool (*pymoe_progress_fn)(float fraction, void * user_data);

/* Tensors whose name matches pattern (POSIX extended regex, searched
 * anywhere in the name, e.g. "blk\\.1[0-9]\\.ffn_.*_exps") go to device.
 * The first matching override wins. */
struct pymoe_tensor_override {
    const char * pattern;
    const char * device;   /* "CPU", or an offload device's name (pymoe_memory_plan lists them) */
};

struct pymoe_model_params {
    uint32_t          size;               /* set by pymoe_model_params_default (Conventions) */
    int32_t           load_mode;          /* enum pymoe_load_mode; default PYMOE_LOAD_AUTO */
    const char *      path;               /* GGUF file; of a split model, the first part
                                             (name-00001-of-0000N.gguf) */
    int32_t           n_gpu_layers;       /* layers on offload devices; -1 = all (default), 0 = none.
                                             As in llama.cpp, n_layers + 1 counts the output layer */
    int32_t           n_cpu_moe;          /* routed expert tensors (*_exps, *_chexps; never the shared
                                             *_shexp) of the first n_cpu_moe layers stay in CPU RAM */
    const struct pymoe_tensor_override * overrides;  /* n_overrides, applied after n_cpu_moe */
    int32_t           n_overrides;
    bool              mtp;                /* also load the model's MTP head (its nextn layers), for
                                             PYMOE_DRAFT_MTP; PYMOE_EUNSUPPORTED for a model without
                                             one. Off by default: the head's weights are not read */
    const char *      rpc_servers;        /* "host:port,host:port": rpc-server processes added as offload
                                             devices, before any local GPU; NULL = none */
    pymoe_progress_fn progress;           /* NULL = no progress reports */
    void *            progress_user_data;
    int32_t           moe_cache_mib;      /* device memory (MiB) for an expert cache: recently used experts of
                                             the layers whose expert tensors stay in host memory, on the device
                                             of their router; 0 = none (default). See pymoe_model_moe_cache */
    int32_t           moe_cache_uploads;  /* most experts copied into the cache per layer and decode; 0 = no
                                             limit; default 1 (a copy is synchronous: over PCIe it costs more
                                             than the CPU reading the expert, bench/results/expert_cache.md) */
};

struct pymoe_model_info {
    char     arch[32];           /* general.architecture, e.g. "llama", "qwen3moe" */
    char     desc[128];          /* llama.cpp's one-line description: type, size, quantization */
    uint64_t n_params;           /* parameters (all experts counted) */
    uint64_t n_bytes;            /* bytes of all weight tensors */
    int32_t  n_layers;           /* transformer blocks */
    int32_t  n_embd;             /* hidden size */
    int32_t  n_head;             /* attention heads (layer 0) */
    int32_t  n_head_kv;          /* key/value heads (layer 0) */
    int32_t  n_ctx_train;        /* context length the model was trained with, tokens */
    int32_t  n_experts;          /* routed experts per MoE layer; 0 for a dense model */
    int32_t  n_experts_used;     /* experts each token is routed to; 0 for a dense model */
    int32_t  n_vocab;            /* tokens in the vocabulary */
    pymoe_token bos;             /* beginning-of-sequence token, -1 if none */
    pymoe_token eos;             /* end-of-sequence token, -1 if none */
    uint64_t vocab_fingerprint;  /* hash of every token's text and attributes: equal
                                    fingerprints = same tokenizer (draft vs target) */
    bool     is_recurrent;       /* all layers recurrent (no KV cache) */
    bool     is_hybrid;          /* attention mixed with recurrent layers */
    int32_t  n_nextn_layers;     /* MTP (nextn) layers in the file, not counted in n_layers */
    bool     mtp_loaded;         /* loaded with pymoe_model_params.mtp: PYMOE_DRAFT_MTP can draft */
};

PYMOE_API void    pymoe_model_params_init(struct pymoe_model_params * params, size_t size);
#define pymoe_model_params_default(params) pymoe_model_params_init((params), sizeof *(params))

/* Load a model. On success *out owns it (free with pymoe_model_free).
 * Returns PYMOE_ENOENT (missing or unreadable file), PYMOE_EFORMAT (not GGUF,
 * truncated, unsupported), PYMOE_ENOMEM, PYMOE_EABORTED (progress returned
 * false) or PYMOE_EBACKEND. *out is NULL on failure. */
PYMOE_API int32_t pymoe_model_load(const struct pymoe_model_params * params, pymoe_model ** out);
PYMOE_API void    pymoe_model_free(pymoe_model * model);  /* NULL is a no-op */

PYMOE_API int32_t pymoe_model_info(const pymoe_model * model, struct pymoe_model_info * out);

/* ---- The expert cache --------------------------------------------------- *
 * With pymoe_model_params.moe_cache_mib, each MoE layer whose expert tensors
 * stay in host memory (n_cpu_moe, overrides to CPU) while its router is on a
 * device keeps n_slots of its experts in that device's memory. A decode of at
 * most max_tokens tokens (decode steps and verify batches) computes the
 * experts it finds there on the device and the others on the CPU from host
 * memory, the same arithmetic either way; after the decode the experts it
 * missed are copied in (at most moe_cache_uploads per layer), each replacing
 * the held expert with the fewest recent uses when it has more (decayed use
 * counts). Ubatches of more than max_tokens (prompts) compute as without a
 * cache.
 * One cache per model, shared by its sessions (their decodes take turns). */
struct pymoe_moe_cache_info {
    bool     enabled;         /* a cache exists */
    int32_t  n_layers;        /* layers it serves */
    int32_t  n_slots;         /* experts per layer it holds (of n_experts) */
    int32_t  max_tokens;      /* decodes of at most this many tokens use it */
    int32_t  upload_cap;      /* experts copied in per layer and decode; 0 = no limit */
    uint64_t bytes;           /* device memory it holds (its slots, a zero slot per layer, tables) */
    uint64_t slot_bytes;      /* one expert of every cached layer: the bytes of one slot per layer */
    char     note[256];       /* why there is no cache or what it leaves out; "" = nothing to say */
};
PYMOE_API int32_t pymoe_model_moe_cache(const pymoe_model * model, struct pymoe_moe_cache_info * out);

/* What a cache did for one session (or, replayed, for a routing trace). */
struct pymoe_moe_cache_stats {
    uint64_t steps;                  /* decodes it served */
    uint64_t tokens;                 /* their tokens */
    uint64_t hits;                   /* expert uses (a token's routed expert in one layer) found in the cache */
    uint64_t misses;                 /* ... not found: computed from host memory */
    uint64_t uploads;                /* experts copied into the cache */
    uint64_t uploaded_bytes;
    uint64_t host_experts;           /* experts read from host memory: per layer and decode, the distinct misses */
    uint64_t host_expert_bytes;      /* their bytes (what bounds decode speed with experts in RAM) */
    uint64_t uncached_expert_bytes;  /* the bytes the same decodes read from host memory without a cache */
    double   upload_seconds;         /* spent copying experts in (the copies wait for the device) */
};

/* The cache's counts for the decodes of this session (since it was created;
 * a speculative loop's are its target's). PYMOE_ESTATE without a cache. */
PYMOE_API int32_t pymoe_session_moe_cache_stats(const pymoe_session * session, struct pymoe_moe_cache_stats * out);

/* The cache policy replayed over one layer's routing trace: ids holds
 * n_used expert ids per token, step_tokens the tokens of each decode (n_steps
 * of them). Adds to *out what a cache of n_slots (upload_cap per decode, 0 =
 * no limit) would have counted, starting empty, with bytes as 1 per expert:
 * with decay 0, the exact policy a loaded cache runs, so the counts equal a
 * session's over the same decodes; a decay in (0, 1) replays the policy with
 * that decay instead (what a use still counts one decode later; small values
 * weigh recency, close to least-recently-used). Ids outside [0, n_experts)
 * count as misses, never cached. */
PYMOE_API int32_t pymoe_moe_cache_replay(int32_t n_experts, int32_t n_used, int32_t n_slots, int32_t upload_cap,
                                         double decay, const int32_t * ids, const int32_t * step_tokens,
                                         int32_t n_steps, struct pymoe_moe_cache_stats * out);

/* Text -> tokens. *n_out receives the number of tokens; when it exceeds
 * capacity, nothing useful is written and PYMOE_ENOSPACE is returned (call
 * again with a buffer of *n_out). add_special: add BOS/EOS as the model's
 * metadata asks. parse_special: "<|im_start|>"-style text becomes the special
 * token instead of plain text. */
PYMOE_API int32_t pymoe_model_tokenize(const pymoe_model * model, const char * text, int32_t text_len,
                                       bool add_special, bool parse_special,
                                       pymoe_token * out, int32_t capacity, int32_t * n_out);

/* Tokens -> UTF-8 bytes (not NUL-terminated). render_special: write special
 * tokens as their text. Same capacity protocol as tokenize; PYMOE_ETOKEN for
 * a token outside the vocabulary. */
PYMOE_API int32_t pymoe_model_detokenize(const pymoe_model * model, const pymoe_token * tokens, int32_t n_tokens,
                                         bool render_special, char * out, int32_t capacity, int32_t * n_out);

/* The bytes of one token, for streaming text. A piece may end inside a UTF-8
 * sequence that the next piece completes. */
PYMOE_API int32_t pymoe_model_token_piece(const pymoe_model * model, pymoe_token token, bool render_special,
                                          char * out, int32_t capacity, int32_t * n_out);

/* One message of a conversation, for pymoe_model_chat_format. */
struct pymoe_chat_message {
    const char * role;     /* "system", "user" or "assistant" */
    const char * content;
};

/* The conversation as the model's chat template (GGUF tokenizer.chat_template)
 * writes it; add_assistant ends it with the start of an assistant reply.
 * llama.cpp recognizes the common templates without a Jinja engine. Writes at
 * most capacity bytes (no NUL) and sets *n_out to the whole length: PYMOE_ENOSPACE
 * when that did not fit. PYMOE_EUNSUPPORTED when the model has no template or
 * llama.cpp does not know it. Message text may itself hold special-token
 * text ("<|im_end|>"): parse special tokens only in the template's own text
 * (pymoe_model_control_tokens lists what to look for), never in a message. */
PYMOE_API int32_t pymoe_model_chat_format(const pymoe_model * model, const struct pymoe_chat_message * messages,
                                          int32_t n_messages, bool add_assistant, char * out, int32_t capacity,
                                          int32_t * n_out);

/* ---- chat templates with tools and reasoning ------------------------------
 * The model's Jinja chat template, rendered and its output parsed by
 * llama.cpp's chat library (the one llama-server uses), with JSON in and out.
 * Returned text is the library's (malloc): free it with pymoe_chat_text_free.
 * A template that does not parse or that raises, a malformed request, and
 * output that does not match the template's format are PYMOE_EINVAL with the
 * library's message. As with pymoe_model_chat_format, parse special tokens
 * only in the template's own text, never in a message's. */
typedef struct pymoe_chat pymoe_chat;
typedef struct pymoe_chat_parser pymoe_chat_parser;

/* template_source: a Jinja template; NULL or "": the model's own (ChatML when it has none). */
PYMOE_API int32_t pymoe_chat_open(const pymoe_model * model, const char * template_source, pymoe_chat ** out);
PYMOE_API void    pymoe_chat_free(pymoe_chat * chat);
PYMOE_API void    pymoe_chat_text_free(char * text);
/* {"supports_tools": bool, "supports_tool_calls": bool, ..., "supports_enable_thinking": bool, "source": "..."} */
PYMOE_API int32_t pymoe_chat_caps(const pymoe_chat * chat, char ** out_json);
/* request_json: {"messages": [OpenAI chat messages], "tools": [...], "tool_choice": "auto" | "none" |
 * "required", "parallel_tool_calls": bool, "add_generation_prompt": bool (default true),
 * "reasoning_format": "auto" | "none" | "deepseek" | "deepseek-legacy", "enable_thinking": bool,
 * "chat_template_kwargs": {...}}. out_json: {"prompt", "format", "format_name", "grammar",
 * "grammar_lazy", "grammar_triggers": [{"type", "value", "token"}], "preserved_tokens",
 * "additional_stops", "generation_prompt", "supports_thinking", "parser"}: the prompt, the grammar
 * that constrains a tool call, and the syntax to parse the reply with. */
PYMOE_API int32_t pymoe_chat_render(const pymoe_chat * chat, const char * request_json, char ** out_json);
/* A parser of a reply: syntax_json is {"format", "parser", "generation_prompt"} of a render's result
 * (what it separates, reasoning and tool calls, follows the render's request). */
PYMOE_API int32_t pymoe_chat_parser_create(const char * syntax_json, pymoe_chat_parser ** out);
PYMOE_API void    pymoe_chat_parser_free(pymoe_chat_parser * parser);
/* The reply so far (partial) or whole as an OpenAI assistant message: {"role", "content",
 * "reasoning_content", "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}. */
PYMOE_API int32_t pymoe_chat_parse(const pymoe_chat_parser * parser, const char * text, bool partial,
                                   char ** out_json);

/* ---- grammars: constrained sampling ---------------------------------------
 * A GBNF grammar over the model's vocabulary (llama.cpp's grammar sampler).
 * spec_json: {"grammar": GBNF (root rule "root") or "json_schema": a JSON
 * schema (converted by llama.cpp's json-schema-to-grammar), "grammar_lazy": bool,
 * "grammar_triggers": [...], "generation_prompt": "..."}, as pymoe_chat_render
 * returns them for a tool call: a lazy grammar constrains nothing until a
 * trigger appears; a generation prompt is what the template wrote of the reply
 * already. A grammar is freed before its model; one thread at a time.
 * To sample: pymoe_grammar_sample, then pymoe_grammar_accept the token. The
 * grammar allows end-of-generation tokens only where it is complete. */
typedef struct pymoe_grammar pymoe_grammar;
struct pymoe_sampling_params;  /* below, with sampling */
PYMOE_API int32_t pymoe_grammar_create(const pymoe_model * model, const char * spec_json, pymoe_grammar ** out);
PYMOE_API void    pymoe_grammar_free(pymoe_grammar * grammar);
PYMOE_API int32_t pymoe_grammar_allows(pymoe_grammar * grammar, pymoe_token token, bool * out);
/* Set the logits of the tokens the grammar does not allow now to -inf (a row of n_vocab). */
PYMOE_API int32_t pymoe_grammar_mask(pymoe_grammar * grammar, float * logits, int32_t n_vocab);
/* The token was emitted: advance (PYMOE_EINVAL for a token the grammar does not allow). */
PYMOE_API int32_t pymoe_grammar_accept(pymoe_grammar * grammar, pymoe_token token);
/* Draw the next token from a logits row under the grammar (it does not advance: pymoe_grammar_accept). The
 * constrained distribution: the tokens the sampling transforms keep (pymoe_sampling_probs) that the grammar
 * allows, renormalized; when it allows none of them, the transforms of the row with every token it does not
 * allow masked. Greedy (temperature 0): the most likely token it allows. Costs a check of the kept tokens, and a
 * mask of the whole row only in that second case. PYMOE_EINVAL when the grammar allows no token at all. The
 * speculative loop (pymoe_spec_set_grammar) verifies against the same distribution. The row is used as given:
 * a sampling's logit_bias and penalties need the sequence, so run pymoe_penalize on a copy of the row first
 * (pymoe_session_sample and the loop do that themselves). */
PYMOE_API int32_t pymoe_grammar_sample(pymoe_grammar * grammar, const float * logits, int32_t n_vocab,
                                       const struct pymoe_sampling_params * params, uint64_t * rng_state,
                                       pymoe_token * out);
/* That distribution as a row of n_vocab probabilities. */
PYMOE_API int32_t pymoe_grammar_probs(pymoe_grammar * grammar, const float * logits, int32_t n_vocab,
                                      const struct pymoe_sampling_params * params, float * probs);

/* True for end-of-generation tokens (EOS, EOT, ...); false outside the vocabulary. */
PYMOE_API bool    pymoe_model_token_is_eog(const pymoe_model * model, pymoe_token token);

/* How a special token eats the whitespace beside it when found in text. */
enum pymoe_token_strip {
    PYMOE_STRIP_LEFT  = 1, /* the whitespace before it */
    PYMOE_STRIP_RIGHT = 2  /* the whitespace after it */
};

/* The tokens that tokenizing with parse_special finds in text (control and
 * unknown tokens: "<|im_start|>", "</s>", ...), ascending, and for each its
 * enum pymoe_token_strip flags in strip (NULL: not wanted). Same capacity
 * protocol as tokenize. */
PYMOE_API int32_t pymoe_model_control_tokens(const pymoe_model * model, pymoe_token * out, uint8_t * strip,
                                             int32_t capacity, int32_t * n_out);

/* ---- GGUF files: the header only ---------------------------------------- *
 * What pymoe reads of a model before loading it (the pre-check and the
 * planner): metadata and the tensor list of every part of a split model,
 * never tensor data. Values of the wrong type or out of range are
 * PYMOE_EFORMAT naming the file and the key. */

typedef struct pymoe_gguf pymoe_gguf;

struct pymoe_gguf_info {
    char     arch[32];     /* general.architecture */
    int32_t  n_parts;      /* files of a split model; 1 otherwise */
    int32_t  n_tensors;    /* over all parts */
    uint64_t n_bytes;      /* bytes of every tensor */
    int32_t  n_layers;     /* <arch>.block_count, at most 512 */
    int32_t  n_embd;       /* <arch>.embedding_length */
    int32_t  n_head;       /* <arch>.attention.head_count (the largest, when given per layer) */
    int32_t  n_vocab;      /* entries of tokenizer.ggml.tokens; 0 when absent */
    int32_t  n_nextn;      /* <arch>.nextn_predict_layers: the last n_nextn of the n_layers blocks are
                              an MTP head (0..n_layers; 0 when absent) */
    int32_t  n_experts;    /* <arch>.expert_count: routed experts per MoE layer; 0 for a dense model */
};

/* One layer's share of a context's memory. */
struct pymoe_gguf_layer {
    uint64_t kv_k_elements;    /* K values per token (KV heads x key length); 0 for a recurrent layer */
    uint64_t kv_v_elements;    /* V values per token */
    uint64_t recurrent_bytes;  /* F32 recurrent state of one sequence; 0 for an attention layer */
};

/* Read the header of path (the first part of a split model: the others are
 * read too). PYMOE_ENOENT (a file missing or unreadable), PYMOE_EFORMAT (not
 * GGUF, truncated, metadata of the wrong type or out of range). */
PYMOE_API int32_t pymoe_gguf_open(const char * path, pymoe_gguf ** out);
PYMOE_API void    pymoe_gguf_free(pymoe_gguf * gguf);  /* NULL is a no-op */
PYMOE_API int32_t pymoe_gguf_get_info(const pymoe_gguf * gguf, struct pymoe_gguf_info * out);
/* Tensor i (0 <= i < n_tensors): its name (valid until pymoe_gguf_free) and bytes. */
PYMOE_API int32_t pymoe_gguf_tensor(const pymoe_gguf * gguf, int32_t i, const char ** name, uint64_t * n_bytes);
/* Layer il (0 <= il < n_layers). */
PYMOE_API int32_t pymoe_gguf_layer(const pymoe_gguf * gguf, int32_t il, struct pymoe_gguf_layer * out);

/* ---- memory: where weights go, and whether they fit ---------------------- *
 * Device index 0 is always the CPU (host RAM); 1.. are the offload devices
 * (RPC servers, then local GPUs) in llama.cpp's order. At most PYMOE_MAX_DEVICES in all. */

enum { PYMOE_MAX_DEVICES = 16 };  /* the CPU and up to 15 offload devices */
enum { PYMOE_MAX_LAYERS = 512 };  /* llama.cpp's limit: a GGUF with more layers is refused */

/* One weight tensor: its GGUF name and its size in bytes. */
struct pymoe_tensor_size {
    const char * name;
    uint64_t     n_bytes;
};

/* The inputs of the placement rule (a pure function of them). */
struct pymoe_placement_request {
    int32_t      n_layers;           /* repeating layers (GGUF <arch>.block_count) */
    int32_t      n_gpu_layers;       /* as in pymoe_model_params */
    int32_t      n_cpu_moe;
    const struct pymoe_tensor_override * overrides;
    int32_t      n_overrides;
    int32_t      n_devices;          /* offload devices (not counting the CPU), 0..PYMOE_MAX_DEVICES - 1 */
    const char * const * device_names;  /* n_devices names, matched by overrides */
    const float * device_split;      /* n_devices weights for spreading layers (llama.cpp uses
                                        free memory); NULL = equal */
    int32_t      n_unloaded_layers;  /* the last n layers' tensors are not loaded (an MTP head loaded
                                        without pymoe_model_params.mtp); 0 = all are */
};

struct pymoe_placement {
    int32_t  n_devices;              /* 1 + offload devices */
    uint64_t bytes[PYMOE_MAX_DEVICES];   /* weight bytes on each device (index 0 = CPU) */
    uint64_t expert_bytes[PYMOE_MAX_DEVICES];  /* of which routed-expert tensors */
    int32_t  output_device;          /* where the output layer lives */
    int32_t  first_gpu_layer;        /* layers >= this are on offload devices (n_layers = none) */
};

/* Which device each tensor goes to, as llama.cpp decides it: token embeddings
 * on the CPU; layer i on an offload device when i >= n_layers + 1 - n_gpu_layers
 * (spread over the devices by device_split); the output layer likewise as
 * layer n_layers; then n_cpu_moe and the overrides, first match wins. A model
 * without output.weight reuses token_embd.weight, which is then also counted
 * on the output device when that is not the CPU. Sizes are padded to 32 bytes
 * as buffers lay them out. device_of (n_tensors entries; -1 for a tensor of
 * an unloaded layer, which no device counts) may be NULL.
 * Assumes every device accepts every tensor (llama.cpp falls back to the CPU
 * for a tensor a device cannot use). PYMOE_EINVAL for a bad pattern or an
 * override naming an unknown device (the message lists the known ones). */
PYMOE_API int32_t pymoe_place_tensors(const struct pymoe_placement_request * request,
                                      const struct pymoe_tensor_size * tensors, int32_t n_tensors,
                                      int32_t * device_of, struct pymoe_placement * out);

/* What this process may lock and allocate, read from the system. Reading them
 * raises the soft RLIMIT_MEMLOCK to the hard limit (the most locking allowed). */
struct pymoe_memory_facts {
    uint64_t mem_available;          /* MemAvailable, bytes; 0 = unknown */
    uint64_t memlock_limit;          /* soft RLIMIT_MEMLOCK after raising, bytes; UINT64_MAX = unlimited */
    uint64_t memlock_hard;           /* hard RLIMIT_MEMLOCK, bytes; UINT64_MAX = unlimited */
    bool     cap_ipc_lock;           /* CAP_IPC_LOCK held: the limit does not bind */
    uint64_t locked_now;             /* VmLck: bytes this process has locked now */
};

PYMOE_API int32_t pymoe_memory_facts_read(struct pymoe_memory_facts * out);

/* The pre-check for one model, before anything is allocated: read the GGUF's
 * tensor list, connect to the RPC servers, place the tensors, read the facts,
 * and decide. Loads no weights; in auto mode llama.cpp reads the metadata once
 * more (allocating nothing) to say whether it would repack CPU weights. */
struct pymoe_memory_plan {
    struct pymoe_placement    placement;
    char                      device_names[PYMOE_MAX_DEVICES][64];  /* index 0 = "CPU" */
    uint64_t                  device_free[PYMOE_MAX_DEVICES];   /* free memory each device reports, bytes */
    struct pymoe_memory_facts facts;
    bool                      repacks;          /* llama.cpp would repack CPU weights into its faster
                                                   kernels' layouts (CPU-only builds: Q4_0, Q4_K, ...),
                                                   which locking turns off; auto then does not lock.
                                                   Found by a dry run that reads metadata only */
    uint64_t                  host_bytes;       /* weights that live in this process's RAM: the CPU
                                                   device's bytes; 0 with mmap (page cache) */
    int32_t                   load_mode;        /* the mode the load would use (auto resolved) */
    bool                      lockable;         /* locking host_bytes would succeed */
    bool                      fits;             /* host_bytes fit in MemAvailable, offload bytes in
                                                   each device's free memory */
    char                      problem[512];     /* why not, with the numbers and the remedy; "" when fine */
};

PYMOE_API int32_t pymoe_memory_plan_for(const struct pymoe_model_params * params, struct pymoe_memory_plan * out);

/* The verdict alone, as a pure function: from plan->placement, device_names,
 * device_free, facts and repacks, fill host_bytes, lockable, fits, load_mode
 * (auto: mlock when lockable and not repacks, else no-mmap) and problem for
 * the requested load_mode. What a planner calls to
 * try placements without touching the system. */
PYMOE_API int32_t pymoe_memory_judge(struct pymoe_memory_plan * plan, int32_t load_mode);

/* What a load did, measured. */
struct pymoe_buffer_size {
    char     name[64];               /* llama.cpp's buffer name: "CPU", "CPU_REPACK", "CUDA0",
                                        "CUDA_Host" (pinned), "RPC0[127.0.0.1:50052]", ... */
    uint64_t n_bytes;
    int32_t  device;                 /* the device index it lives on (0 = CPU); -1 = not recognised */
};

struct pymoe_load_report {
    uint32_t                 size;            /* sizeof(struct pymoe_load_report), set by the caller (Conventions) */
    int32_t                  load_mode;       /* the mode used (auto resolved) */
    bool                     fell_back;       /* auto wanted mlock but could not: no-mmap was used */
    double                   load_seconds;
    double                   bytes_per_second;  /* weight bytes / load_seconds */
    uint64_t                 locked_bytes;    /* VmLck after the load: every byte this process has locked,
                                                 this model's weights included */
    int32_t                  lock_failures;   /* locks llama.cpp reported failing (it only warns) */
    uint64_t                 pinned_bytes;    /* weights in pinned host buffers (*_Host; CUDA builds) */
    int32_t                  pin_failures;    /* pinned allocations that failed and fell back to plain
                                                 CPU buffers (llama.cpp says so only at debug level) */
    uint64_t                 host_bytes;      /* weights in this process's RAM: CPU buffers of every
                                                 kind, pinned or not (0 with mmap) */
    int32_t                  n_buffers;
    struct pymoe_buffer_size buffers[32];     /* weight buffers, as llama.cpp allocated them */
    uint64_t                 device_bytes[PYMOE_MAX_DEVICES];  /* their bytes per device, indexed as plan.placement */
    struct pymoe_memory_plan plan;            /* the pre-check the load ran */
};

PYMOE_API int32_t pymoe_model_load_report(const pymoe_model * model, struct pymoe_load_report * out);

/* ---- session ------------------------------------------------------------- */

enum pymoe_flash_attn {
    PYMOE_FLASH_ATTN_AUTO = -1,
    PYMOE_FLASH_ATTN_OFF  =  0,
    PYMOE_FLASH_ATTN_ON   =  1
};

struct pymoe_session_params {
    uint32_t     size;            /* set by pymoe_session_params_default (Conventions) */
    uint32_t     n_ctx;           /* context size, tokens; default 4096; 0 = the model's n_ctx_train */
    uint32_t     n_batch;         /* most tokens handed to llama.cpp in one decode; default 512 */
    uint32_t     n_ubatch;        /* physical micro-batch, <= n_batch; default 512 */
    int32_t      n_threads;       /* threads for one-token decoding, at most 512; 0 = one per physical
                                     core this process may run on (default; as llama.cpp's tools) */
    int32_t      n_threads_batch; /* threads for multi-token batches, at most 512; 0 = n_threads (default) */
    int32_t      flash_attn;      /* enum pymoe_flash_attn; default PYMOE_FLASH_ATTN_AUTO */
    const char * cache_type_k;    /* K cache type, one of pymoe_cache_types(); NULL = "f16" */
    const char * cache_type_v;    /* V cache type, likewise (quantized V needs flash attention) */
    uint32_t     n_rs_seq;        /* recurrent-state snapshots, so that hybrid/recurrent models can rewind up to
                                   * n_rs_seq positions of their last feed (llama.cpp: experimental, honoured
                                   * only for some architectures, e.g. qwen35/qwen35moe; read back with
                                   * pymoe_session_n_rs_seq). Costs (1 + n_rs_seq) x the recurrent state. 0 = none */
    bool         record_routing;  /* record which experts each token is routed to (pymoe_session_routing);
                                     for diagnostics: decoding is slower. Default false */
    pymoe_abort_fn abort;         /* asked during each feed: true stops it (PYMOE_EABORTED); NULL = never */
    void *         abort_user_data;
};

PYMOE_API void    pymoe_session_params_init(struct pymoe_session_params * params, size_t size);
#define pymoe_session_params_default(params) pymoe_session_params_init((params), sizeof *(params))

/* The KV cache types a session accepts, comma-separated ("f16,f32,..."). */
PYMOE_API const char * pymoe_cache_types(void);

/* Bytes of a KV cache of n_ctx tokens: n_ctx x (k_elements x size(type_k) +
 * v_elements x size(type_v)), k/v_elements the values per token of the
 * layers counted (pymoe_gguf_layer). Types by name, NULL = f16;
 * PYMOE_EINVAL for a type not in pymoe_cache_types(). */
PYMOE_API int32_t pymoe_kv_cache_bytes(uint64_t k_elements, uint64_t v_elements, uint32_t n_ctx,
                                       const char * type_k, const char * type_v, uint64_t * out);

/* The experts the router chose for each token of the last feed in layer
 * `layer`: *n_tokens rows of *n_used expert ids (*n_tokens is 0 for a layer
 * without routed experts), valid until the next feed. PYMOE_ESTATE when the
 * session was created without record_routing. */
PYMOE_API int32_t pymoe_session_routing(const pymoe_session * session, int32_t layer, const int32_t ** experts,
                                        int32_t * n_used, int32_t * n_tokens);

/* Create a session. The model must outlive it. Returns PYMOE_EINVAL (bad
 * params: n_ubatch > n_batch, unknown cache type), PYMOE_ENOMEM (the KV cache
 * or compute buffers for n_ctx do not fit; checked against available memory
 * before allocating) or PYMOE_EBACKEND; *out is untouched on failure. */
PYMOE_API int32_t pymoe_session_create(pymoe_model * model, const struct pymoe_session_params * params,
                                       pymoe_session ** out);
PYMOE_API void    pymoe_session_free(pymoe_session * session);  /* NULL is a no-op */

/* Append n_tokens tokens at the current position and evaluate them, in
 * chunks of n_batch. Afterwards the logits of the last token are available,
 * and with all_logits those of every token of this feed (then n_tokens must
 * be <= n_batch). Errors: PYMOE_ETOKEN (a token outside the vocabulary),
 * PYMOE_ECONTEXT (position + n_tokens > n_ctx), PYMOE_EINVAL (checked before
 * anything changes: the previous logits stay valid), PYMOE_EBACKEND (decode
 * failed: the position is restored, the logits are gone). */
PYMOE_API int32_t pymoe_session_feed(pymoe_session * session, const pymoe_token * tokens, int32_t n_tokens,
                                     bool all_logits);

/* Logits of the last feed: *rows points to *n_rows rows of n_vocab floats
 * (one row, or one per fed token with all_logits), the last row last. The
 * memory belongs to the session and is valid until the next feed, rewind,
 * reset, state load or free. PYMOE_ESTATE when there are none. */
PYMOE_API int32_t pymoe_session_logits(pymoe_session * session, const float ** rows, int32_t * n_rows);

/* Remove the last n positions (0 <= n <= position); logits become unavailable.
 * A KV cache drops any number of positions. Recurrent state (hybrid and
 * recurrent models) rewinds only through snapshots: at most
 * pymoe_session_rewind_limit() positions, once per feed; beyond that
 * PYMOE_EUNSUPPORTED (restore a checkpoint instead). */
PYMOE_API int32_t pymoe_session_rewind(pymoe_session * session, int32_t n);

/* How many positions pymoe_session_rewind can remove now: the position for
 * a KV cache; for recurrent state min(n_rs_seq, tokens of the last feed's last
 * chunk - 1), and 0 after a rewind, reset or restore. */
PYMOE_API int32_t pymoe_session_rewind_limit(const pymoe_session * session);
/* The recurrent-state snapshots llama.cpp granted (0 for models it does not
 * support them for, whatever was asked). */
PYMOE_API int32_t pymoe_session_n_rs_seq(const pymoe_session * session);
/* Does the model keep recurrent state (hybrid or recurrent)? */
PYMOE_API bool    pymoe_session_is_recurrent(const pymoe_session * session);

/* Checkpoints, the rollback for recurrent state that works for any distance:
 * save copies the recurrent part of the state (O(1) in the context length,
 * kept on the device that holds it) and the position; restore goes back to
 * it, dropping the KV cache positions after it. One checkpoint per session; a
 * later save replaces it, and a rewind or reset to before it forgets it. PYMOE_EUNSUPPORTED for models without recurrent
 * state (their KV cache rewinds directly; a checkpoint would copy all of it). */
PYMOE_API int32_t pymoe_session_checkpoint(pymoe_session * session);
PYMOE_API int32_t pymoe_session_restore(pymoe_session * session);
/* Bytes a checkpoint copies (the recurrent state of the sequence); 0 without recurrent state. */
PYMOE_API size_t  pymoe_session_checkpoint_size(const pymoe_session * session);

/* Forget everything: position 0, no logits.
 * A session a speculative loop drives (pymoe_spec_create until
 * pymoe_spec_free) refuses feed, feed_rows, rewind, checkpoint, restore,
 * reset and state_load with PYMOE_ESTATE: the loop keeps the sequence. */
PYMOE_API int32_t pymoe_session_reset(pymoe_session * session);

PYMOE_API int32_t pymoe_session_position(const pymoe_session * session);  /* tokens in the context */
/* The tokens the context holds, oldest first: *tokens points to *n of them
 * (n = position), memory of the session valid until it next changes. */
PYMOE_API int32_t pymoe_session_tokens(const pymoe_session * session, const pymoe_token ** tokens, int32_t * n);
PYMOE_API int32_t pymoe_session_n_ctx(const pymoe_session * session);     /* context size, tokens */
PYMOE_API int32_t pymoe_session_n_vocab(const pymoe_session * session);
PYMOE_API int32_t pymoe_session_n_threads(const pymoe_session * session); /* threads of one-token decodes */

/* Save the sequence state (the tokens, KV cache and position, and what model,
 * context size and cache types it belongs to) into buf. With buf NULL or
 * capacity too small, *n_out receives the size needed (PYMOE_ENOSPACE when
 * buf is not NULL). Logits are not part of the state. */
PYMOE_API int32_t pymoe_session_state_save(pymoe_session * session, uint8_t * buf, size_t capacity, size_t * n_out);

/* Replace the session's state with one saved from a session of the same model,
 * context size and cache types. Logits become unavailable. PYMOE_EINVAL, the
 * session untouched, for bytes that are not such a state (the message names
 * what differs: the model, the context size, the cache types, or damage);
 * PYMOE_EBACKEND when llama.cpp then rejects them, and the session is empty. */
PYMOE_API int32_t pymoe_session_state_load(pymoe_session * session, const uint8_t * buf, size_t size);

/* ---- sampling -------------------------------------------------------------
 * One transform for plain sampling and speculative verification (drafts and
 * the target's rows alike):
 *   top-k, then top-p, then min-p on the softmax of the logits, then the
 *   temperature on what is left. temperature 0 = greedy (argmax, ties to the
 *   lowest id). The random state is an argument: same seed, same tokens. */

struct pymoe_logit_bias {
    pymoe_token token;
    float       bias;  /* added to the token's logit (-INFINITY: never chosen) */
};

struct pymoe_sampling_params {
    uint32_t size;        /* set by pymoe_sampling_params_default (Conventions) */
    float   temperature;  /* 0 = greedy; default 0.8 */
    int32_t top_k;        /* keep the k most likely tokens; 0 = off; default 40 */
    float   top_p;        /* keep the smallest set with total probability >= top_p; 1 = off; default 0.95 */
    float   min_p;        /* drop tokens below min_p * (largest probability); 0 = off; default 0.05 */
    /* Before the transforms, where the sequence is known (a session's sampling, the speculative loop's verify
     * rows, pymoe_penalize; not the single-row pymoe_sample and pymoe_sampling_probs): logit_bias, then for each
     * token in the last repeat_last_n tokens of the sequence (the prompt's included; a verify row's: the drafts
     * before it too), a positive logit divided by repeat_penalty (a negative one multiplied), then
     * presence_penalty and frequency_penalty * (its count there) subtracted. */
    float   repeat_penalty;     /* 1 = off (default) */
    int32_t repeat_last_n;      /* the window; 0 = no penalties, -1 = the whole sequence; default 64 */
    float   presence_penalty;   /* 0 = off (default) */
    float   frequency_penalty;  /* 0 = off (default) */
    int32_t n_logit_bias;
    const struct pymoe_logit_bias * logit_bias;  /* n_logit_bias entries (NULL: none); read during each call only */
};

PYMOE_API void    pymoe_sampling_params_init(struct pymoe_sampling_params * params, size_t size);
#define pymoe_sampling_params_default(params) pymoe_sampling_params_init((params), sizeof *(params))
/* PYMOE_EINVAL, naming the field, for values out of range (every call that samples checks them too). */
PYMOE_API int32_t pymoe_sampling_params_check(const struct pymoe_sampling_params * params);

/* Seed a random state (any seed is fine, 0 included). */
PYMOE_API void    pymoe_rng_seed(uint64_t * state, uint64_t seed);
/* Next uniform double in [0, 1); advances the state. */
PYMOE_API double  pymoe_rng_uniform(uint64_t * state);

/* The distribution sampling draws from: probs[n_vocab] sums to 1 over the
 * tokens the transforms keep, 0 elsewhere (one-hot when greedy). */
PYMOE_API int32_t pymoe_sampling_probs(const float * logits, int32_t n_vocab,
                                       const struct pymoe_sampling_params * params, float * probs);

/* The token at which the cumulative sum of probs first exceeds u * sum(probs)
 * (u in [0, 1)); skips zero entries. */
PYMOE_API int32_t pymoe_sampling_pick(const float * probs, int32_t n_vocab, double u, pymoe_token * out);

/* Sample one token from a logits row; one uniform drawn from *rng_state unless greedy. */
PYMOE_API int32_t pymoe_sample(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                               uint64_t * rng_state, pymoe_token * out);

/* Apply logit_bias and the penalties over history (the sequence the row follows) to a row, in place. */
PYMOE_API int32_t pymoe_penalize(float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                                 const pymoe_token * history, int32_t n_history);

/* Sample from the last logits row of the session, the bias and penalties over its tokens (no allocation per
 * call without them). */
PYMOE_API int32_t pymoe_session_sample(pymoe_session * session, const struct pymoe_sampling_params * params,
                                       uint64_t * rng_state, pymoe_token * out);

/* ---- log probabilities ----------------------------------------------------
 * What a row of logits says of a token: its log probability under the
 * model's own distribution (log softmax at temperature 1, before the sampling
 * transforms and any constraint, as llama-server and OpenAI's API report it:
 * a greedy row's transformed distribution would say 0 and -inf), and the
 * n_top most likely tokens with theirs. */
enum { PYMOE_MAX_TOP_LOGPROBS = 20 };

struct pymoe_logprob {
    pymoe_token token;
    float       logprob;                               /* -inf for a token whose logit is -inf */
    int32_t     n_top;
    pymoe_token top_ids[PYMOE_MAX_TOP_LOGPROBS];       /* the most likely first; equal logits: lower id first */
    float       top_logprobs[PYMOE_MAX_TOP_LOGPROBS];
};

/* token in [0, n_vocab) (PYMOE_ETOKEN), n_top in [0, PYMOE_MAX_TOP_LOGPROBS]. PYMOE_ENUMERIC for a row with
 * NaN or infinite logits, PYMOE_EINVAL for one that is all -inf. */
PYMOE_API int32_t pymoe_logprob(const float * logits, int32_t n_vocab, pymoe_token token, int32_t n_top,
                                struct pymoe_logprob * out);
/* The same from the session's last logits row (no allocation per call). */
PYMOE_API int32_t pymoe_session_logprob(pymoe_session * session, pymoe_token token, int32_t n_top,
                                        struct pymoe_logprob * out);

/* ---- speculative verification (pure: no llama.cpp, no globals) ------------
 * A draft model proposed tokens d_1..d_k; the target scored the sequence
 * [last, d_1..d_k] in one batch. pymoe_verify decides how many of the draft
 * tokens to keep and which token follows them.
 *   greedy:     accept while argmax p_i == d_i; next = argmax p at the first
 *               mismatch, or argmax p_{k+1} when all k were accepted. The rows
 *               may be probabilities or raw logits (only the argmax is used;
 *               ties go to the lowest id).
 *   stochastic: accept d_i when u_i * q_i(d_i) < p_i(d_i), i.e. with
 *               probability min(1, p_i(d_i) / q_i(d_i)) (q_i(d_i) = 0 with
 *               p_i(d_i) > 0 accepts; p_i(d_i) = 0 rejects). At the first
 *               rejection next is drawn with u_k from normalize(max(0, p_i - q_i)),
 *               or from p_i when that is all zero (only possible when p_i == q_i
 *               and d_i was not drawn from q_i). When all k are accepted next is
 *               drawn with u_k from p_{k+1}. Rows must be the distributions after
 *               the same sampling transforms (pymoe_sampling_probs). The emitted
 *               tokens are then distributed exactly as sampling from the target. */

enum pymoe_verify_mode {
    PYMOE_VERIFY_GREEDY     = 0,
    PYMOE_VERIFY_STOCHASTIC = 1
};

/* draft: k tokens (k >= 0); q: k rows of n_vocab (draft distributions; unused,
 * may be NULL, when greedy); p: k + 1 rows of n_vocab (target); u: k + 1
 * uniforms in [0, 1) (unused, may be NULL, when greedy). Writes *n_accepted in
 * [0, k] and *next. PYMOE_ETOKEN when a draft token is outside [0, n_vocab);
 * PYMOE_EINVAL for NULL or inconsistent arguments or a target row with no
 * probability mass. */
PYMOE_API int32_t pymoe_verify(int32_t mode, const pymoe_token * draft, int32_t k, const float * q, const float * p,
                               int32_t n_vocab, const double * u, int32_t * n_accepted, pymoe_token * next);

/* A distribution row carried as the tokens it keeps (what top-k, top-p and
 * min-p leave: usually a few dozen of a 152k vocabulary): n ids in ascending
 * order, each with its probability; every other token has probability 0. */
struct pymoe_sparse_row {
    const pymoe_token * ids;
    const float *       p;
    int32_t             n;
};

/* pymoe_verify's stochastic mode on sparse rows (q: k rows, p: k + 1 rows),
 * reading no full-vocabulary row: the same decision as pymoe_verify on the
 * same rows written out densely, for every input (the draws visit tokens in
 * ascending id order, as the dense verifier does). Rows after the first
 * rejected draft are not read: a caller that knows where that is may leave
 * them empty (n = 0). PYMOE_EINVAL when a row's ids are not ascending within
 * [0, n_vocab). */
PYMOE_API int32_t pymoe_verify_sparse(const pymoe_token * draft, int32_t k, const struct pymoe_sparse_row * q,
                                      const struct pymoe_sparse_row * p, int32_t n_vocab, const double * u,
                                      int32_t * n_accepted, pymoe_token * next);

/* ---- speculative decoding loop -------------------------------------------
 * A target session decodes one sequence with drafts from a draft session
 * (same tokenizer), from the context itself, or both (enum
 * pymoe_draft_source). Each round a source proposes up to k tokens, the target scores
 * [last, d_1..d_k] in one batch, pymoe_verify keeps a prefix and adds one
 * token, and both caches drop what was rejected. The sessions belong to the
 * caller and must outlive the pymoe_spec; while it exists they refuse
 * the calls that would change what they hold (feed them through the loop). Hybrid and recurrent models roll back by snapshots or
 * checkpoints (enum pymoe_rollback). */

/* Where a round's drafts come from (draft_sources, a set of bits). Each round
 * asks the sources in this order and drafts from the first that proposes:
 *   LOOKUP: copied from the context. The longest suffix of the sequence
 *           (ngram_min..ngram_max tokens) that occurred before proposes what
 *           followed it there. It costs microseconds and no memory on a
 *           device; the draft length is learned per match length, and no
 *           match (or a match too short to pay) leaves the round to the next
 *           source, or to plain decoding.
 *   MODEL:  a draft model's session (the draft argument of pymoe_spec_create).
 *   MTP:    the target's own multi-token-prediction head (its nextn layers;
 *           the target model loaded with pymoe_model_params.mtp): one layer
 *           fed the target's last hidden state and the newest token proposes
 *           the token after it, then runs on its own output. No second model,
 *           no second vocabulary. Not together with MODEL.
 * A lookup draft is deterministic: verification treats it as a draft
 * distribution that is one-hot on the proposed token, so sampled output
 * still follows the target's distribution exactly. */
enum pymoe_draft_source {
    PYMOE_DRAFT_MODEL  = 1,
    PYMOE_DRAFT_LOOKUP = 2,
    PYMOE_DRAFT_MTP    = 4,
};

/* the longest match a lookup measures (ngram_max's upper bound) */
enum { PYMOE_NGRAM_MAX = 24 };

typedef struct pymoe_spec pymoe_spec;

enum pymoe_stop_reason {
    PYMOE_STOP_NONE         = 0, /* still going */
    PYMOE_STOP_MAX_TOKENS   = 1,
    PYMOE_STOP_EOG          = 2, /* the target chose an end-of-generation token (not returned, not in
                                    the sequence: feed before the next round) */
    PYMOE_STOP_CONTEXT_FULL = 3, /* target or draft context has no room for another token */
    PYMOE_STOP_CALLBACK     = 4  /* the token callback returned false */
};

struct pymoe_spec_params {
    uint32_t size;        /* set by pymoe_spec_params_default (Conventions) */
    int32_t  draft_max;   /* fixed draft length k, or the largest k auto may choose;
                             0..PYMOE_SPEC_MAX_DRAFT, default 4 */
    bool     auto_draft;  /* choose k in [0, draft_max] each round from measured costs; default false */
    float    draft_p_min; /* stop drafting when the draft's top probability (its confidence, not a
                             sampling transform) is below this; 0 = never, the default */
    const struct pymoe_sampling_params * sampling;  /* read once, by pymoe_spec_create; temperature 0 =
                                                       greedy verification; NULL (the default):
                                                       pymoe_sampling_params_default's (sampled) */
    uint64_t seed;        /* random state for drafting and verification */
    int32_t  rollback;    /* enum pymoe_rollback: how the target drops rejected drafts; default AUTO */
    int32_t  draft_sources;  /* enum pymoe_draft_source bits; default PYMOE_DRAFT_MODEL */
    int32_t  ngram_min;      /* the shortest match a lookup proposes from, 1..ngram_max; default 2 */
    int32_t  ngram_max;      /* matches are measured up to this length, ..PYMOE_NGRAM_MAX; default 12 */
};

/* the largest draft length: a verify batch of it (and the newest token) stays
 * under llama.cpp's op-offload batch of 32, so that experts in RAM are never
 * copied to the GPU for a verify batch */
enum { PYMOE_SPEC_MAX_DRAFT = 30 };

/* How a model drops rejected draft tokens. AUTO picks the cheapest the
 * session supports: REMOVE for a KV cache; for recurrent state SNAPSHOT when
 * the session has snapshots (n_rs_seq; a round drafting more than n_rs_seq
 * tokens takes a checkpoint), else CHECKPOINT: save before verifying, and
 * after a partial acceptance restore and evaluate the accepted tokens again
 * (with the next round's batch). The draft of a hybrid pair always uses
 * checkpoints: snapshots cover one batch, and it drafts one token per batch. */
enum pymoe_rollback {
    PYMOE_ROLLBACK_AUTO       = 0,
    PYMOE_ROLLBACK_REMOVE     = 1,
    PYMOE_ROLLBACK_SNAPSHOT   = 2,
    PYMOE_ROLLBACK_CHECKPOINT = 3,
};

struct pymoe_spec_stats {
    uint32_t size;               /* sizeof(struct pymoe_spec_stats), set by the caller (Conventions) */
    int64_t rounds;              /* verify batches */
    int64_t drafted;             /* draft tokens proposed */
    int64_t accepted;            /* draft tokens accepted */
    int64_t emitted;             /* tokens emitted (accepted + one per round, minus a dropped EOG) */
    int64_t accepted_hist[PYMOE_SPEC_MAX_DRAFT + 1];  /* rounds by number of accepted draft tokens */
    double  draft_seconds;       /* draft decoding and sampling */
    double  verify_seconds;      /* target batches */
    double  other_seconds;       /* transforms, verification, bookkeeping */
    double  draft_sampling_seconds;  /* of draft_seconds: the draft's sampling transforms and draws */
    double  target_sampling_seconds; /* of other_seconds: the target rows' sampling transforms */
    double  verifier_seconds;        /* of other_seconds: pymoe_verify */
    double  verify_seconds_by_n[PYMOE_SPEC_MAX_DRAFT + 2];  /* target batch time by batch size n = k + 1
                                                               (index n, 1..PYMOE_SPEC_MAX_DRAFT + 1) */
    int64_t verify_count_by_n[PYMOE_SPEC_MAX_DRAFT + 2];
    int64_t rounds_by_k[PYMOE_SPEC_MAX_DRAFT + 1];    /* rounds by the draft length chosen for them (before
                                                          draft_p_min) */
    int32_t last_k;              /* the k of the last round */
    int32_t max_verify_batch;    /* the largest target batch a round evaluated (tokens evaluated again
                                    after a restore included); kept below llama.cpp's op-offload batch */
    double  acceptance_estimate; /* what auto believes a draft token's acceptance rate is */
    int64_t gated_rounds;        /* rounds auto's cost model chose to draft in and whole-round
                                    measurements against plain rounds made plain */
    int32_t rollback_target;     /* enum pymoe_rollback each model uses (never AUTO) */
    int32_t rollback_draft;
    int64_t checkpoints;         /* checkpoints saved (target and draft) */
    int64_t restores;            /* checkpoints restored after a partial acceptance */
    int64_t refed_tokens;        /* tokens the target evaluated again after a restore */
    double  rollback_seconds;    /* saving and restoring checkpoints, dropping positions (both models) */
    uint64_t checkpoint_bytes;   /* bytes one target checkpoint copies (0: none taken) */
    /* drafts copied from the context (PYMOE_DRAFT_LOOKUP), by match length
     * (index: ngram_min..ngram_max); included in drafted and accepted */
    int64_t lookup_matches[PYMOE_NGRAM_MAX + 1];   /* rounds that found a match of this length */
    int64_t lookup_rounds[PYMOE_NGRAM_MAX + 1];    /* of which drafted from it */
    int64_t lookup_drafted[PYMOE_NGRAM_MAX + 1];
    int64_t lookup_accepted[PYMOE_NGRAM_MAX + 1];
    /* drafts of the draft model or the MTP head by depth (index i: the i-th
     * draft token of a round, 1..PYMOE_SPEC_MAX_DRAFT): acceptance per depth is
     * depth_accepted[i] / depth_drafted[i] (a token after a rejection is not
     * counted as drafted there) */
    int64_t depth_drafted[PYMOE_SPEC_MAX_DRAFT + 1];
    int64_t depth_accepted[PYMOE_SPEC_MAX_DRAFT + 1];
    double  mtp_seconds;         /* of draft_seconds: the MTP head's catch-up and drafts */
    int64_t mtp_tokens;          /* positions the MTP head evaluated (catch-up and drafts) */
};

/* What one round saw, for checking the loop from outside: the target's logits
 * of the verify batch (n_draft + 1 rows of n_vocab), the draft tokens and
 * what pymoe_verify decided. The round then emits draft[0..n_accepted) and
 * next, cut before the first end-of-generation token. Valid only during the call. */
struct pymoe_spec_round {
    const pymoe_token * draft;
    int32_t             n_draft;
    const float *       target_logits;  /* the model's rows (the verdict was made on them with bias and penalties) */
    int32_t             n_vocab;
    int32_t             n_accepted;
    pymoe_token         next;
};
typedef void (*pymoe_spec_inspect_fn)(const struct pymoe_spec_round * round, void * user_data);

/* Called for each emitted token; return false to stop. */
typedef bool (*pymoe_token_fn)(pymoe_token token, void * user_data);

PYMOE_API void    pymoe_spec_params_init(struct pymoe_spec_params * params, size_t size);
#define pymoe_spec_params_default(params) pymoe_spec_params_init((params), sizeof *(params))

/* Check the pair (same tokenizer, up to 128 tokens of padding; empty
 * sessions) and create the loop. draft is NULL when draft_sources has no
 * PYMOE_DRAFT_MODEL (lookup or MTP drafts). With PYMOE_DRAFT_MTP the target's
 * session gets the MTP head's context (it keeps it, and frees it with
 * itself, so the loop may go first or last), and keeps the hidden state of
 * every position it evaluates from then on; PYMOE_EINVAL when the target
 * model was loaded without pymoe_model_params.mtp. PYMOE_EINVAL names both vocabulary sizes
 * when the draft does not fit the target; PYMOE_EINVAL for a rollback the
 * target cannot do (REMOVE on recurrent state, SNAPSHOT without snapshots,
 * CHECKPOINT on a KV cache). */
PYMOE_API int32_t pymoe_spec_create(pymoe_session * target, pymoe_session * draft,
                                    const struct pymoe_spec_params * params, pymoe_spec ** out);
PYMOE_API void    pymoe_spec_free(pymoe_spec * spec);  /* NULL is a no-op */

/* Append tokens to the sequence (the prompt, or a later turn): evaluated on
 * both models; the last one waits to start the next round. Lookup drafts
 * match against everything fed and generated since the last reset. */
PYMOE_API int32_t pymoe_spec_feed(pymoe_spec * spec, const pymoe_token * tokens, int32_t n_tokens);

/* Tokens in the sequence: fed and emitted (the newest counted, though the
 * models evaluate it with the next round; an end-of-generation token that
 * stopped generation is not in the sequence). */
PYMOE_API int32_t pymoe_spec_position(const pymoe_spec * spec);
/* The sequence, oldest first: *tokens points to *n (= position) tokens,
 * memory of the loop valid until the next call that changes it. */
PYMOE_API int32_t pymoe_spec_tokens(const pymoe_spec * spec, const pymoe_token ** tokens, int32_t * n);

/* Keep the first n_keep tokens of the sequence (0 <= n_keep <= position) and
 * drop the rest from everything the loop holds: both sessions' caches (or
 * their pending tokens), the lookup index and the MTP head's entries. The
 * newest kept token waits for the next round, as after a feed; 0 is a
 * reset. A target with a KV cache goes back any distance. Recurrent state
 * goes back through the snapshots of its last batch or the checkpoint of
 * the last drafting round: pymoe_spec_rewind_limit() tokens; beyond that
 * PYMOE_EUNSUPPORTED, nothing changed (reset and feed the tokens to keep). A
 * draft model whose recurrent state cannot go back starts over on the kept
 * tokens. What auto has learned and the statistics stay. */
PYMOE_API int32_t pymoe_spec_rewind(pymoe_spec * spec, int32_t n_keep);
/* How many of the last tokens pymoe_spec_rewind can drop now: position for a
 * target with a KV cache, fewer for recurrent state (0: none but by a reset). */
PYMOE_API int32_t pymoe_spec_rewind_limit(const pymoe_spec * spec);

/* The whole loop's state: the sequence, the pending tokens, both sessions'
 * states (pymoe_session_state_save's bytes) and the MTP head's entries and
 * queue. The lookup index is rebuilt from the sequence on load. What auto has
 * learned is not part of it (it belongs to the models and the machine, not
 * to a sequence: pymoe_spec_learned_save); a loop that loads keeps its own.
 * With buf NULL, *n_out receives the size (PYMOE_ENOSPACE when capacity is
 * smaller). PYMOE_ESTATE on a broken loop. */
PYMOE_API int32_t pymoe_spec_state_save(pymoe_spec * spec, uint8_t * buf, size_t capacity, size_t * n_out);
/* Go on from such a state, in a loop over the same models (each session's
 * model, context size and cache types are checked) and draft sources.
 * PYMOE_EINVAL, the loop unchanged, for another loop's or damaged bytes that
 * the target refuses; when a later part is refused the loop is left empty
 * (reset), never half loaded. */
PYMOE_API int32_t pymoe_spec_state_load(pymoe_spec * spec, const uint8_t * buf, size_t size);

/* Start a new sequence: both sessions and the loop's pending tokens are
 * emptied (a loop broken by a failed decode works again); the statistics and
 * what auto has learned are kept. */
PYMOE_API int32_t pymoe_spec_reset(pymoe_spec * spec);

/* Constrain the rounds from now on by a grammar (NULL: none) of the target's
 * model: drafts it forbids are cut before the verify batch, row i of a batch
 * is the constrained distribution (pymoe_grammar_sample) after the first i
 * drafts, and the grammar advances by every emitted token (not by an end of
 * generation, nor by pymoe_spec_feed). The output is what plain decoding
 * under the grammar gives: the same greedy tokens, the same distribution when
 * sampled. The loop borrows the grammar: keep it until it is set to NULL or
 * the loop is freed. A rewind or a state load does not take it back. */
PYMOE_API int32_t pymoe_spec_set_grammar(pymoe_spec * spec, pymoe_grammar * grammar);

/* Sample the rounds from now on with these settings, the random draws from
 * seed (a server's next request; temperature 0 verifies greedily). The
 * sequence and what auto has learned are kept. */
PYMOE_API int32_t pymoe_spec_set_sampling(pymoe_spec * spec, const struct pymoe_sampling_params * sampling,
                                          uint64_t seed);

/* Score every token the rounds emit from now on: its log probability and the
 * n_top most likely tokens (pymoe_logprob), read from the verify row that
 * chose it: the row plain decoding reads at that position. n_top -1 (the
 * default): none, at no cost. */
PYMOE_API int32_t pymoe_spec_set_logprobs(pymoe_spec * spec, int32_t n_top);
/* The last pymoe_spec_step's scores, one per emitted token in out's order
 * (*n = its *n_out; 0 while scoring is off); valid until the next call on the loop. */
PYMOE_API int32_t pymoe_spec_logprobs(const pymoe_spec * spec, const struct pymoe_logprob ** scores, int32_t * n);

/* One round: writes the emitted tokens (at most max_tokens, and at most
 * draft_max + 1) to out and their count to *n_out, and why the generation
 * must stop to *stop (PYMOE_STOP_NONE to go on). capacity >= draft_max + 1.
 * PYMOE_EINVAL for max_tokens < 0. A decode that fails during a round leaves
 * the caches out of step: the loop then refuses every call but
 * pymoe_spec_reset (and free) with PYMOE_ESTATE; the reset makes it work
 * again, on an empty sequence. */
PYMOE_API int32_t pymoe_spec_step(pymoe_spec * spec, int32_t max_tokens, pymoe_token * out, int32_t capacity,
                                  int32_t * n_out, int32_t * stop);

/* Rounds until max_tokens are emitted or another stop; on_token (may be NULL)
 * streams each token. When it returns false the loop stops after delivering
 * the rest of the current round (those tokens are already in the sequence). */
PYMOE_API int32_t pymoe_spec_run(pymoe_spec * spec, int32_t max_tokens, pymoe_token_fn on_token, void * user_data,
                                 int32_t * n_out, int32_t * stop);

PYMOE_API int32_t pymoe_spec_stats(const pymoe_spec * spec, struct pymoe_spec_stats * out);

/* What draft_max auto has learned (verify cost per batch size, the draft's
 * and the loop's own costs, acceptances, which draft lengths measurably paid)
 * as bytes, for a later loop over the same models on the same machine: a
 * short generation then starts where this one stopped instead of learning
 * again. buf NULL: only *size (the bytes needed). PYMOE_EINVAL when capacity
 * is smaller. */
PYMOE_API int32_t pymoe_spec_learned_save(const pymoe_spec * spec, void * buf, size_t capacity, size_t * size);
/* Start auto from such bytes (before the first round, or at any time: the
 * exploration schedule and probe budget start afresh). PYMOE_EINVAL, the
 * loop unchanged, when they are another build's format, were learned with
 * other draft sources, k_max or rollback, or hold figures no run produces.
 * Which models and machine they belong to is the caller's to know. */
PYMOE_API int32_t pymoe_spec_learned_load(pymoe_spec * spec, const void * buf, size_t size);
PYMOE_API void    pymoe_spec_set_inspect(pymoe_spec * spec, pymoe_spec_inspect_fn fn, void * user_data);

/* PYMOE_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PYMOE_H */
