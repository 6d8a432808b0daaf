/* internal.h - shared between libpymoe's source files; not installed. */
#ifndef PYMOE_INTERNAL_H
#define PYMOE_INTERNAL_H

#include "pymoe.h"
#include "rng.h"
#include "llama.h"

#ifdef __cplusplus
extern "C" {  /* llama_guard.cpp */
#endif

/* Record the failure detail for pymoe_last_error() and return status. */
int32_t pymoe_fail(int32_t status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));
/* A successful call clears the detail. */
int32_t pymoe_ok(void);

/* A result struct that grows (pymoe.h, Conventions): *(uint32_t *) out is the caller's size of it; copy that
 * much of the library's full one (whose size field is set here) and tell the caller how much it got.
 * PYMOE_EINVAL, out untouched, when the size is below min_size (not set). */
int32_t pymoe_struct_out(void * out, void * full, size_t full_size, size_t min_size, const char * name);
/* A params struct that grows (pymoe.h, Conventions). *_init: the defaults (full, full_size bytes) as a caller's
 * struct of size bytes: the fields it has, zeros past the library's, its size field set. */
void    pymoe_struct_init(void * params, const void * full, size_t full_size, size_t size);
/* A caller's params (in, whose size field says its size) over the defaults in full (full_size bytes): the fields
 * it has are taken; past full_size it must be zeros (fields this library does not know). PYMOE_EINVAL names
 * what is wrong: no size (not made by *_default), or a field set that this library does not know. */
int32_t pymoe_struct_in(const void * in, void * full, size_t full_size, size_t min_size, const char * name);
/* The size a params struct had when it gained its size field, up to and with its last field then: callers of
 * that release have at least this much. Kept as it is when fields are added. */
#define PYMOE_PARAMS_V1(type, last) (offsetof(type, last) + sizeof(((type *) 0)->last))
/* A params struct ends with its last field, no padding after it: a field added later must make it larger, or a
 * newer caller's field would fit in this library's padding and be ignored instead of refused. */
#define PYMOE_PARAMS_END_AT(type, last) \
    _Static_assert(sizeof(type) == offsetof(type, last) + sizeof(((type *) 0)->last), \
                   #type " has padding after " #last ": order its fields so that it has none")
/* A caller's model or session params over the defaults, into local (pymoe_struct_in). */
int32_t pymoe_model_params_in(const struct pymoe_model_params * params, struct pymoe_model_params * local);
int32_t pymoe_session_params_in(const struct pymoe_session_params * params, struct pymoe_session_params * local);

/* Our own messages, through the log callback. */
void pymoe_log(int32_t level, const char * fmt, ...) __attribute__((format(printf, 2, 3)));
/* The last error line llama.cpp logged on this thread ("" if none); clear before a call to read it after. */
const char * pymoe_llama_last_error(void);
void         pymoe_llama_clear_error(void);
/* Did the last error llama.cpp logged on this thread say it could not allocate memory? The one place an
 * allocation failure (PYMOE_ENOMEM) is told from other failures of a llama.cpp call. */
bool         pymoe_llama_ran_out_of_memory(void);
/* Install the log hook once, before anything calls into llama.cpp. */
void         pymoe_init(void);
/* Seconds on a monotonic clock. */
double       pymoe_now(void);

/* llama.cpp calls on what a file holds, where llama.cpp's asserts (and
 * exceptions) become a PYMOE_EFORMAT error on this thread (llama_guard.cpp);
 * pymoe_guard_install routes ggml's aborts once, at initialization. */
void                 pymoe_guard_install(void);
struct llama_model *   pymoe_guarded_model_load(const char * path, struct llama_model_params params);
struct llama_context * pymoe_guarded_init_context(struct llama_model * model, struct llama_context_params params);
int32_t pymoe_guarded_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                               llama_token * out, int32_t capacity, bool add_special, bool parse_special, int32_t * n);
int32_t pymoe_guarded_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                                 char * out, int32_t capacity, bool render_special, int32_t * n);
int32_t pymoe_guarded_token_piece(const struct llama_vocab * vocab, llama_token token, char * out, int32_t capacity,
                                  bool render_special, int32_t * n);
/* ggml_backend_rpc_add_server(endpoint) through the guard: its connection failures are errors. */
int32_t pymoe_guarded_rpc_add_server(void * add_server, const char * endpoint, void ** reg);
/* fn(data) with ggml's asserts turned into exceptions that fn may catch; one that escapes fn is PYMOE_EFORMAT */
int32_t pymoe_guarded_run(const char * what, void (*fn)(void *), void * data);
int32_t pymoe_guarded_chat_template(const char * tmpl, const struct llama_chat_message * chat, size_t n,
                                    bool add_assistant, char * out, int32_t capacity, int32_t * n_out);

struct pymoe_model {
    struct llama_model *       llama;
    struct pymoe_expert_cache * cache;          /* NULL: none */
    struct pymoe_moe_cache_info cache_info;
    const struct llama_vocab * vocab;
    struct pymoe_model_info    info;
    struct pymoe_load_report   report;
    uint64_t                   kv_elements[2];  /* K and V values one token adds to the KV cache (all layers) */
};

/* Lines llama.cpp logs on this thread go to fn as well (NULL: stop). */
typedef void (*pymoe_line_observer)(int32_t level, const char * line, void * data);
void pymoe_log_observe(pymoe_line_observer fn, void * data);

/* PYMOE_ENOENT / PYMOE_EFORMAT, with the detail, unless path is a readable GGUF file
 * (precise messages for what gguf would report vaguely). */
int32_t pymoe_gguf_check_file(const char * path);
/* Every tensor of an open GGUF (all parts), in file order. */
const struct pymoe_tensor_size * pymoe_gguf_tensors(const pymoe_gguf * gguf, int32_t * n);

/* The offload devices of one load: rpc-server endpoints, then local GPUs.
 * dev is NULL-terminated (llama_model_params.devices). */
struct pymoe_devices {
    int32_t                    n;
    struct ggml_backend_device * dev[PYMOE_MAX_DEVICES];  /* + the NULL terminator */
    char                       names[PYMOE_MAX_DEVICES - 1][64];
    uint64_t                   free[PYMOE_MAX_DEVICES - 1];
};
int32_t pymoe_devices_resolve(const char * rpc_servers, struct pymoe_devices * out);

/* rpc.c: receive and send timeouts (pymoe_rpc_set_timeout) on this process's connections to endpoint
 * (ggml connects while buffers on the server exist: after a load); returns how many. pymoe_rpc_lost: ggml's RPC client failed on a thread of its own: count it, keep its
 * message, and park the thread for good (never returns). */
int32_t pymoe_rpc_arm(const char * endpoint);
void    pymoe_rpc_arm_all(const char * servers);  /* each of "host:port,host:port" */
void    pymoe_rpc_lost(const char * message);

/* VmLck of this process, and MemAvailable, in bytes (0 when unknown). */
uint64_t pymoe_locked_bytes_now(void);
uint64_t pymoe_mem_available(void);

/* The regex for "routed experts of layers 0..n_cpu_moe-1", one pattern for the
 * placement rule and the load alike. */
enum { PYMOE_CPU_MOE_PATTERN_SIZE = 8192 };
void pymoe_cpu_moe_pattern(int32_t n_cpu_moe, char * out, size_t size);

/* A routed-expert tensor name (blk.N.ffn_{up,down,gate,gate_up}_{exps,chexps}...). */
bool pymoe_is_routed_expert(const char * name);

/* A load request as llama.cpp's model params (the strings of the overrides
 * stay owned by the request). */
enum { PYMOE_MAX_OVERRIDES = 64 };
struct pymoe_llama_params {
    struct llama_model_params               params;
    struct llama_model_tensor_buft_override overrides[PYMOE_MAX_OVERRIDES + 2];  /* + n_cpu_moe + terminator */
    char                                    cpu_moe_pattern[PYMOE_CPU_MOE_PATTERN_SIZE];
};
int32_t pymoe_llama_params(const struct pymoe_model_params * params, struct pymoe_devices * devices,
                           int32_t load_mode, struct pymoe_llama_params * out);
/* One "load_tensors: <name> model buffer size = <x> MiB" line of llama.cpp's
 * log (its only account of the weight buffers it allocated) -> name and bytes. */
bool pymoe_parse_buffer_line(const char * line, struct pymoe_buffer_size * out);
/* CPU buffers of every kind and pinned "*_Host" ones: weights in this process's RAM. */
bool pymoe_is_host_buffer(const char * name);
/* Would llama.cpp repack CPU weights in this load (a dry run that allocates nothing)? */
bool pymoe_repacking_would_be_used(const char * path, struct llama_model_params lp);

/* The pre-check of a load, also handing back the devices it resolved (for the
 * load itself) and, unless NULL, the K and V values one token adds to the KV
 * cache of every layer (kv_elements[2], added to). */
int32_t pymoe_memory_precheck(const struct pymoe_model_params * params, struct pymoe_memory_plan * out,
                              struct pymoe_devices * devices, uint64_t * kv_elements);

/* One sampling candidate: token id, its logit, its probability. */
typedef struct {
    pymoe_token id;
    float       logit;
    float       p;
} pymoe_candidate;

/* Shared with the speculative loop, which reads the model and position. */
struct pymoe_session {
    pymoe_model *          model;
    struct llama_context * ctx;
    llama_memory_t         mem;
    struct llama_batch     batch;        /* reused by every feed: n_batch slots */
    int32_t                n_batch;
    int32_t                n_ctx;
    int32_t                n_vocab;
    int32_t                pos;          /* tokens in the context = next position */
    pymoe_token *          tokens;       /* what the context holds: tokens[0..pos) (n_ctx of room) */
    bool                   in_loop;      /* a speculative loop drives it: the public calls that change
                                            the context refuse (the loop uses pymoe_owned_*) */
    const float *          logits;       /* (n_logit_rows, n_vocab) of the last feed; NULL = none */
    int32_t                n_logit_rows;
    pymoe_candidate *      scratch;      /* PYMOE_SAMPLING_SCRATCH(n_vocab) bytes */
    bool                   recurrent;    /* the memory holds recurrent state (hybrid or recurrent model) */
    int32_t                n_rs_seq;     /* snapshots llama.cpp granted */
    int32_t                rewindable;   /* positions a rewind may remove now (recurrent state) */
    uint8_t *              ckpt;         /* the checkpoint: llama.cpp's partial sequence state */
    size_t                 ckpt_size, ckpt_cap;
    int32_t                ckpt_pos;     /* -1: none */
    struct pymoe_routing * routing;      /* the router's choices of the last feed; NULL: not recorded */
    struct llama_context_params cparams; /* what ctx was created with (an MTP head's context copies it) */
    pymoe_abort_fn         abort;        /* the caller's stop request (NULL: none) */
    void *                 abort_user_data;
    uint32_t               interrupts;   /* pymoe_interrupt_count() when the running feed started */
    struct pymoe_mtp *     mtp;          /* the MTP head a speculative loop drafted with (NULL: none): the
                                            session owns it, so it goes first whatever order things close in */
    struct pymoe_eval_watch *    watch;  /* the eval callback's recorders (NULL: none) */
    struct pymoe_moe_cache_stats cache_stats;  /* the expert cache's counts for this session (and its MTP head) */
};

/* context_params.c: a session's params, checked (PYMOE_EINVAL naming what is wrong) and translated for
 * llama.cpp; n_ctx 0 is the model's training context, threads 0 one per physical core. */
int32_t pymoe_context_params(const pymoe_model * model, const struct pymoe_session_params * params,
                             struct llama_context_params * out);

/* session.c: what the public calls that change a session do, without the
 * check that no speculative loop owns it (for the loop that does). */
int32_t pymoe_owned_feed(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, int32_t first_row);
int32_t pymoe_owned_rewind(pymoe_session * s, int32_t n);
int32_t pymoe_owned_checkpoint(pymoe_session * s);
int32_t pymoe_owned_restore(pymoe_session * s);
int32_t pymoe_owned_reset(pymoe_session * s);
int32_t pymoe_owned_state_load(pymoe_session * s, const uint8_t * buf, size_t size);

/* interrupt.c: how many interrupts there have been (a call that saw this change stops). */
uint32_t pymoe_interrupt_count(void);

/* huge_pages.c: the anonymous regions a load creates (its buffers) advised
 * for huge pages, or collapsed into them; returns the bytes advised. */
struct pymoe_anon_regions;
struct pymoe_anon_regions * pymoe_anon_regions_now(void);
void                        pymoe_anon_regions_free(struct pymoe_anon_regions * r);
uint64_t                    pymoe_huge_pages_advise(const struct pymoe_anon_regions * before, bool collapse);

/* routing.c: the experts each token of a feed was routed to, per layer,
 * recorded by llama.cpp's eval callback (pymoe_routing_eval). */
struct pymoe_routing;
struct ggml_tensor;
struct pymoe_routing * pymoe_routing_new(int32_t n_layers);
void                   pymoe_routing_free(struct pymoe_routing * r);
void                   pymoe_routing_clear(struct pymoe_routing * r);
bool                   pymoe_routing_eval(struct ggml_tensor * t, bool ask, void * user_data);
/* The layer of a router's choices tensor ("ffn_moe_topk-<layer>"), -1 for any other. */
int32_t                pymoe_routing_layer(const struct ggml_tensor * t);
/* One layer's record: false when there is none, or it is incomplete (out of memory). */
bool                   pymoe_routing_get(const struct pymoe_routing * r, int32_t layer, const int32_t ** ids,
                                         int32_t * n_used, int32_t * n_tokens);

/* A feed whose logits are kept for positions first..n_tokens-1 (the speculative
 * loop re-evaluates tokens it already verified and needs no rows for them). */
int32_t pymoe_session_feed_rows(pymoe_session * s, const pymoe_token * tokens, int32_t n_tokens, int32_t first);

/* An integer from the model's metadata key "<arch>.<key>", or fallback. */
int32_t pymoe_meta_int(const pymoe_model * model, const char * key, int32_t fallback);
/* PYMOE_ETOKEN, with the detail, if a token is outside the vocabulary. */
int32_t pymoe_check_tokens(const pymoe_model * model, const pymoe_token * tokens, int32_t n);


/* mtp.c: the target's MTP head as a draft source (the comment there says how it keeps up). */
struct pymoe_mtp;
struct pymoe_gguf_info;
/* PYMOE_EUNSUPPORTED, with the detail, unless the file has an MTP head pymoe can draft with. */
int32_t pymoe_mtp_check(const struct pymoe_gguf_info * info, const char * path);
/* The target session's head (created on first use, emptied on each), in *out. */
int32_t pymoe_mtp_attach(pymoe_session * target, struct pymoe_mtp ** out);
void    pymoe_mtp_free(struct pymoe_mtp * m);  /* pymoe_session_free's, before its context */
void    pymoe_mtp_clear(struct pymoe_mtp * m);
int32_t pymoe_mtp_reserve(struct pymoe_mtp * m, int32_t n_tokens, int32_t n_rows);
void    pymoe_mtp_add_tokens(struct pymoe_mtp * m, const pymoe_token * tokens, int32_t n, bool drafted);
int32_t pymoe_mtp_add_rows(struct pymoe_mtp * m, int32_t first, int32_t n);
/* Greedy acceptance tests of first drafts read from a catch-up (mtp.c: catch_up): argmax over the first
 * n_common tokens against the token that followed. */
struct pymoe_mtp_tests {
    int32_t n_common;
    int32_t tests, passed;
};
int32_t pymoe_mtp_catch_up(struct pymoe_mtp * m, int32_t * evaluated, struct pymoe_mtp_tests * tests);
int32_t pymoe_mtp_backlog(const struct pymoe_mtp * m);
int32_t pymoe_mtp_first(struct pymoe_mtp * m, const float ** logits, int32_t * evaluated,
                        struct pymoe_mtp_tests * tests);
int32_t pymoe_mtp_next(struct pymoe_mtp * m, pymoe_token d, const float ** logits);
int32_t pymoe_mtp_drop_drafts(struct pymoe_mtp * m);
int32_t pymoe_mtp_position(const struct pymoe_mtp * m);
/* The sequence now ends at n_keep (> 0, <= pymoe_mtp_position): the entries and queued tokens past it go. */
int32_t pymoe_mtp_rewind(struct pymoe_mtp * m, int32_t n_keep);
/* The head's part of a loop's state: its size, and save into exactly that many bytes; a load checks the bytes
 * against the loop's sequence of n_seq tokens (PYMOE_EINVAL, nothing changed), and empties the head when
 * llama.cpp rejects them. */
size_t  pymoe_mtp_state_size(const struct pymoe_mtp * m);
int32_t pymoe_mtp_state_save(struct pymoe_mtp * m, uint8_t * buf, size_t size);
int32_t pymoe_mtp_state_load(struct pymoe_mtp * m, const uint8_t * buf, size_t size, const pymoe_token * seq,
                             int32_t n_seq);

/* Scratch for sampling a row of n tokens: n candidates, then n floats. */
#define PYMOE_SAMPLING_SCRATCH(n) ((size_t) (n) * (sizeof(pymoe_candidate) + sizeof(float)))

/* What the row passes return for a row they cannot use (found in the pass
 * they make anyway): a NaN or +inf (a broken model), or nothing above -inf. */
enum { PYMOE_ROW_NOT_NUMBERS = -1000, PYMOE_ROW_EMPTY = -1001 };  /* apart from the status codes */
#define PYMOE_ROW_UNUSABLE(x) ((x) == PYMOE_ROW_NOT_NUMBERS || (x) == PYMOE_ROW_EMPTY)
/* The error for such a row: PYMOE_ENUMERIC or PYMOE_EINVAL, naming whose row ("the target's row 2 at position
 * 17"). */
int32_t pymoe_row_fail(int32_t why, const char * whose);

/* Apply the sampling transforms (temperature > 0) to a logits row; c
 * (PYMOE_SAMPLING_SCRATCH(n_vocab) bytes) gets the kept tokens in
 * c[0..return), p summing to 1, the most likely first (the rest sorted,
 * except when top_k is 0). A PYMOE_ROW_* value for a row it cannot use. */
int32_t pymoe_sampling_transform(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * p,
                                 pymoe_candidate * c);

/* Whether the transforms keep every token of a row (sampling at a temperature alone). */
bool    pymoe_sampling_keeps_all(const struct pymoe_sampling_params * p, int32_t n_vocab);
/* Such a row's distribution as every token's probability, probs[0..n_vocab), in vector passes; returns the
 * most likely token, or a PYMOE_ROW_* value for a row it cannot use. */
pymoe_token pymoe_sampling_dense(const float * logits, int32_t n_vocab, float temperature, float * probs);

/* qsort's order of candidates by ascending id. */
int pymoe_by_id(const void * a, const void * b);
/* The k (0 < k < n) largest logits into c, largest first (ties: lower id first); a PYMOE_ROW_* value for a row
 * it cannot use. */
int32_t pymoe_top_candidates(const float * logits, int32_t n, int32_t k, pymoe_candidate * c);
/* log(sum(exp(logits))) of a row, into *out; a PYMOE_ROW_* value for a row it cannot use. */
int32_t pymoe_log_sum_exp(const float * logits, int32_t n, double * out);
/* pymoe_logprob without checks: scratch holds PYMOE_SAMPLING_SCRATCH(n_vocab) bytes (unused when n_top is 0);
 * a PYMOE_ROW_* value for a row it cannot use. */
int32_t pymoe_logprob_with(const float * logits, int32_t n_vocab, pymoe_token token, int32_t n_top,
                           pymoe_candidate * scratch, struct pymoe_logprob * out);
/* penalties.c: a row changed in place by logit_bias and the penalties, and what to put back. */
struct pymoe_row_patch {
    float *       row;
    int32_t       n;
    pymoe_token * ids;  /* one allocation: ids, then was */
    float *       was;
};
/* Whether params change logits before the transforms (a bias, or a penalty over a window). */
bool    pymoe_sampling_changes_logits(const struct pymoe_sampling_params * params);
/* Change row for params, the sequence being a (n_a tokens) followed by b (n_b); pymoe_row_unpatch puts it back
 * (after an error nothing is changed). lenient: a bias for a token outside the row is skipped (a draft model's
 * smaller vocabulary), else PYMOE_ETOKEN. */
int32_t pymoe_row_patch(float * row, int32_t n_vocab, const struct pymoe_sampling_params * params, bool lenient,
                        const pymoe_token * a, int32_t n_a, const pymoe_token * b, int32_t n_b,
                        struct pymoe_row_patch * patch);
void    pymoe_row_unpatch(struct pymoe_row_patch * patch);
/* Shared by pymoe_sample and pymoe_session_sample; scratch holds n_vocab candidates; whose: the row's name in
 * an error ("the logits at position 17"). */
int32_t pymoe_sample_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                          uint64_t * rng_state, pymoe_candidate * scratch, const char * whose, pymoe_token * out);
/* Index of the largest value; ties go to the lowest index (greedy sampling and verification); a PYMOE_ROW_*
 * value for a row it cannot use. */
pymoe_token pymoe_argmax(const float * row, int32_t n);
/* pymoe_verify_sparse without its checks of the arguments, for rows the loop built itself (ids ascending
 * within the vocabulary, uniforms in [0, 1)): the checks read every id, 152k a row at a temperature alone. */
int32_t pymoe_verify_sparse_rows(const pymoe_token * draft, int32_t k, const struct pymoe_sparse_row * q,
                                 const struct pymoe_sparse_row * p, const double * u, int32_t * n_accepted,
                                 pymoe_token * next);
/* The sparse verifier's test for draft token d against its draft row q and target row p with uniform u. */
bool pymoe_sparse_accepts(pymoe_token d, const struct pymoe_sparse_row * q, const struct pymoe_sparse_row * p,
                          double u);
/* A caller's sampling params, checked: *use is params itself when its size is this library's, else local
 * (the defaults and the fields the caller's struct has); PYMOE_EINVAL, with the detail, for a wrong size or an
 * out-of-range value. */
int32_t pymoe_sampling_params_in(const struct pymoe_sampling_params * params, struct pymoe_sampling_params * local,
                                 const struct pymoe_sampling_params ** use);
/* pymoe_sampling_probs without checks or allocation (scratch:
 * PYMOE_SAMPLING_SCRATCH(n_vocab) bytes); returns how many tokens have probability > 0 (a PYMOE_ROW_* value). */
int32_t pymoe_probs_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                         pymoe_candidate * scratch, float * probs);

/* grammar.cpp: the constrained distribution (pymoe.h, pymoe_grammar_sample), for plain sampling and the
 * speculative loop alike. The transformed row's candidates the grammar allows into c[0..*n)
 * (PYMOE_SAMPLING_SCRATCH(n_vocab) bytes), p summing to 1; temperature 0: the one most likely token the grammar
 * allows. A PYMOE_ROW_* value (not a status) for a row that is not numbers. */
int32_t pymoe_grammar_dist(pymoe_grammar * g, const float * logits, int32_t n_vocab,
                           const struct pymoe_sampling_params * params, pymoe_candidate * c, int32_t * n);
/* A copy of the grammar's state, to walk drafts with (the loop's own: freed with pymoe_grammar_free). */
int32_t pymoe_grammar_fork(const pymoe_grammar * g, pymoe_grammar ** out);
/* Whether the grammar is over the model's vocabulary. */
bool    pymoe_grammar_of(const pymoe_grammar * g, const pymoe_model * model);

#ifdef __cplusplus
}
#endif

#endif

/* expert_cache.c: the model's expert cache (pymoe_model_params.moe_cache_mib). */
struct pymoe_expert_cache;
struct pymoe_eval_watch;
struct llama_context_params;
int32_t pymoe_expert_cache_create(pymoe_model * m, int32_t mib, int32_t upload_cap);  /* sets m->cache, m->cache_info */
void    pymoe_expert_cache_free(struct pymoe_expert_cache * c);
/* A context's eval callback: the user's routing recorder (NULL: none) and the
 * cache's; *out stays NULL (and cp untouched) when neither is needed. */
int32_t pymoe_eval_watch_new(const pymoe_model * m, struct pymoe_routing * user, struct llama_context_params * cp,
                             struct pymoe_eval_watch ** out);
void    pymoe_eval_watch_free(struct pymoe_eval_watch * w);
/* Around every decode of a model with a cache (c NULL: no-ops): begin takes
 * the cache, end waits for the device, counts the decode's small ubatches into
 * st, copies in what they missed and gives the cache back. decoded: the decode
 * succeeded. */
void    pymoe_expert_cache_begin(struct pymoe_expert_cache * c, struct pymoe_eval_watch * w);
void    pymoe_expert_cache_end(struct pymoe_expert_cache * c, struct llama_context * ctx, struct pymoe_eval_watch * w,
                               bool decoded, struct pymoe_moe_cache_stats * st);
/* expert_cache_hook.cpp: pymoe's llama.cpp patch. */
bool                 pymoe_llama_has_expert_cache(void);
struct ggml_tensor * pymoe_llama_tensor(const struct llama_model * model, const char * name);
void                 pymoe_llama_expert_cache(const struct ggml_tensor * w, struct ggml_tensor * cache,
                                              struct ggml_tensor * slot_of, struct ggml_tensor * host_of,
                                              int32_t max_tokens);
