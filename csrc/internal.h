/* internal.h - shared between libpymoe's source files; not installed. */
#ifndef PYMOE_INTERNAL_H
#define PYMOE_INTERNAL_H

#include "pymoe.h"
#include "llama.h"

/* Record the failure detail for pymoe_last_error() and return status. */
int32_t pymoe_fail(int32_t status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));
/* A successful call clears the detail. */
int32_t pymoe_ok(void);

/* Our own messages, through the log callback. */
void pymoe_log(int32_t level, const char * fmt, ...) __attribute__((format(printf, 2, 3)));
/* The last error line llama.cpp logged on this thread ("" if none); clear before a call to read it after. */
const char * pymoe_llama_last_error(void);
void         pymoe_llama_clear_error(void);
/* Install the log hook once, before anything calls into llama.cpp. */
void         pymoe_init(void);

struct pymoe_model {
    struct llama_model *       llama;
    const struct llama_vocab * vocab;
    struct pymoe_model_info    info;
};

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
    const float *          logits;       /* (n_logit_rows, n_vocab) of the last feed; NULL = none */
    int32_t                n_logit_rows;
    pymoe_candidate *      scratch;      /* n_vocab candidates for sampling */
};

/* An integer from the model's metadata key "<arch>.<key>", or fallback. */
int32_t pymoe_meta_int(const pymoe_model * model, const char * key, int32_t fallback);
/* PYMOE_ETOKEN, with the detail, if a token is outside the vocabulary. */
int32_t pymoe_check_tokens(const pymoe_model * model, const pymoe_token * tokens, int32_t n);


/* Shared by pymoe_sample and pymoe_session_sample; scratch holds n_vocab candidates. */
int32_t pymoe_sample_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                          uint64_t * rng_state, pymoe_candidate * scratch, pymoe_token * out);
/* Index of the largest value; ties go to the lowest index (greedy sampling and verification). */
pymoe_token pymoe_argmax(const float * row, int32_t n);
/* PYMOE_EINVAL, with the detail, for out-of-range sampling parameters. */
int32_t pymoe_check_sampling_params(const struct pymoe_sampling_params * params);
/* pymoe_sampling_probs without checks or allocation (scratch: n_vocab
 * candidates); returns how many tokens have probability > 0. */
int32_t pymoe_probs_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                         pymoe_candidate * scratch, float * probs);

#endif
