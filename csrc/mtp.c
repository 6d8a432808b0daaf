/* mtp.c - the target's own MTP head as a draft source.
 *
 * A model with nextn layers carries a multi-token-prediction head: one more
 * decoder layer that takes the target's hidden state h_{p-1} (before the
 * output norm, at the position that predicted token x_p) together with x_p,
 * and predicts x_{p+1}. llama.cpp runs it in a context of its own over the
 * same model (LLAMA_CONTEXT_TYPE_MTP), whose KV cache holds the head's one
 * layer: entry p is (x_p, h_{p-1}).
 *
 * The head's cache must hold entries made from the target's hidden states
 * (the states of accepted tokens), so it runs behind the target: the tokens
 * of the sequence it has not evaluated wait in `tokens`, the target's hidden
 * states for them in `rows` (rows[0] = h_{pos-1}, zeros at the start). A
 * draft first catches up on every entry whose hidden state is known, in one
 * batch (after plain rounds, several), and the last of them is the newest
 * token's: its logits propose d_1. Each further draft token is the head run
 * on its own output (d_i with the head's own hidden state), entries past the
 * sequence that are dropped before the next catch-up. Rejected drafts never
 * reach the head's cache, so rollback is a KV-cache removal even when the
 * target is hybrid: the target's rollback is the loop's business.
 *
 * The head belongs to the target's session (its context reads the session's
 * and the model's): a loop attaches to it, and the session frees it. The
 * session then keeps every position's hidden state, a copy of n_embd floats
 * per token. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* nextn.cpp: the hidden states, through llama.cpp's staging API */
void          pymoe_nextn_keep_all(struct llama_context * ctx, bool on);
void          pymoe_nextn_keep_outputs(struct llama_context * ctx);
const float * pymoe_nextn_row(struct llama_context * ctx, int32_t i);

struct pymoe_mtp {
    pymoe_session *          target;
    struct llama_context *   ctx;       /* the head's context over the target's model */
    llama_memory_t           mem;
    struct llama_batch_ext * batch;
    int32_t                  n_embd;
    int32_t                  pos;       /* entries [0, pos) evaluated, all of the sequence */
    pymoe_token *            tokens;    /* the sequence from pos on */
    int32_t                  n_tokens, cap_tokens;
    float *                  rows;      /* h_{pos-1}, h_pos, ...: n_rows of n_embd */
    int32_t                  n_rows, cap_rows;
    int32_t                  out;       /* batch index of the last decode's output (-1: none) */
    int32_t                  n_drafted; /* entries past pos the drafts added */
    int32_t                  tested_from; /* the first queued entry that is a fair acceptance test: those before
                                             it propose tokens the head itself drafted (accepted ones pass by
                                             construction) */
    struct pymoe_eval_watch * watch;    /* the head's routing, for the expert cache (NULL: none) */
};

/* Architectures whose MTP graph in the pinned llama.cpp runs one head fed
 * the trunk's hidden state (others chain heads, share the target's cache,
 * or abort on what pymoe feeds them). */
static const char * const ONE_HEAD[] = { "qwen35", "qwen35moe", "qwen3next", "glm4moe", "deepseek2" };

int32_t pymoe_mtp_check(const struct pymoe_gguf_info * info, const char * path) {
    if (info->n_nextn == 0) {
        return pymoe_fail(PYMOE_EUNSUPPORTED,
                          "'%s' has no MTP head (%s.nextn_predict_layers is 0 or absent): the architecture has "
                          "none, or the GGUF was converted without its nextn layers; draft with a draft model or "
                          "ngram instead", path, info->arch);
    }
    bool known = false;
    for (size_t i = 0; i < sizeof(ONE_HEAD) / sizeof(ONE_HEAD[0]); i++) {
        known = known || strcasecmp(info->arch, ONE_HEAD[i]) == 0;
    }
    if (!known || info->n_nextn != 1) {
        return pymoe_fail(PYMOE_EUNSUPPORTED,
                          "'%s': pymoe drafts with one MTP head of qwen35, qwen35moe, qwen3next, glm4moe or "
                          "deepseek2 models; this is %s with %d nextn layer(s)", path, info->arch, info->n_nextn);
    }
    return PYMOE_OK;
}

void pymoe_mtp_free(struct pymoe_mtp * m) {
    if (!m) {
        return;
    }
    if (m->batch) {
        llama_batch_ext_free(m->batch);
    }
    if (m->ctx) {
        llama_free(m->ctx);
    }
    pymoe_eval_watch_free(m->watch);
    free(m->tokens);
    free(m->rows);
    free(m);
}

void pymoe_mtp_clear(struct pymoe_mtp * m) {
    llama_memory_clear(m->mem, true);
    m->pos       = 0;
    m->n_tokens  = 0;
    m->n_rows    = 1;
    m->out       = -1;
    m->n_drafted   = 0;
    m->tested_from = 0;
    memset(m->rows, 0, sizeof(float) * (size_t) m->n_embd);  /* h_{-1}: zeros, what the first token is paired with */
}

int32_t pymoe_mtp_attach(pymoe_session * target, struct pymoe_mtp ** out) {
    *out = NULL;
    if (target->mtp) {
        pymoe_mtp_clear(target->mtp);
        *out = target->mtp;
        return PYMOE_OK;
    }
    const struct pymoe_model_info * info = &target->model->info;
    if (!info->mtp_loaded) {
        return pymoe_fail(PYMOE_EINVAL, "MTP drafts need the target model loaded with its MTP head "
                          "(pymoe_model_params.mtp; Model(..., mtp=True))");
    }
    struct pymoe_mtp * m = calloc(1, sizeof(*m));
    if (!m) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    m->target = target;
    m->n_embd = llama_model_n_embd_out(target->model->llama);
    /* the target's context's settings (threads, batch sizes, cache types, flash attention), as an MTP context */
    struct llama_context_params cp = target->cparams;
    cp.ctx_type          = LLAMA_CONTEXT_TYPE_MTP;
    cp.ctx_other         = target->ctx;
    cp.n_ctx             = (uint32_t) target->n_ctx;
    cp.n_rs_seq          = 0;
    cp.cb_eval           = NULL;  /* the head's routing is recorded only for the expert cache */
    cp.cb_eval_user_data = NULL;
    int32_t rc           = pymoe_eval_watch_new(target->model, NULL, &cp, &m->watch);
    if (rc != PYMOE_OK) {
        free(m);
        return rc;
    }
    pymoe_llama_clear_error();
    m->ctx = pymoe_guarded_init_context(target->model->llama, cp);
    if (!m->ctx) {
        const char * why = pymoe_llama_last_error();
        pymoe_eval_watch_free(m->watch);
        free(m);
        return pymoe_fail(pymoe_llama_ran_out_of_memory() ? PYMOE_ENOMEM : PYMOE_EBACKEND,
                          "could not create the MTP head's context: %s", why[0] ? why : "(no message)");
    }
    m->mem        = llama_get_memory(m->ctx);
    m->batch      = llama_batch_ext_init(m->ctx);
    m->cap_tokens = 64;
    m->cap_rows   = 64;
    m->tokens     = malloc(sizeof(*m->tokens) * (size_t) m->cap_tokens);
    m->rows       = malloc(sizeof(float) * (size_t) m->cap_rows * (size_t) m->n_embd);
    if (!m->batch || !m->tokens || !m->rows) {
        pymoe_mtp_free(m);
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    pymoe_mtp_clear(m);
    pymoe_nextn_keep_all(target->ctx, true);
    pymoe_nextn_keep_outputs(m->ctx);
    target->mtp = m;
    *out        = m;
    return PYMOE_OK;
}

static bool grow(void ** buf, int32_t * cap, int32_t need, size_t item) {
    if (need <= *cap) {
        return true;
    }
    int32_t n = *cap;
    while (n < need) {
        n *= 2;
    }
    void * grown = realloc(*buf, item * (size_t) n);
    if (!grown) {
        return false;
    }
    *buf = grown;
    *cap = n;
    return true;
}

/* Room for more tokens and hidden states, before anything irreversible. */
int32_t pymoe_mtp_reserve(struct pymoe_mtp * m, int32_t n_tokens, int32_t n_rows) {
    if (!grow((void **) &m->tokens, &m->cap_tokens, m->n_tokens + n_tokens, sizeof(*m->tokens)) ||
        !grow((void **) &m->rows, &m->cap_rows, m->n_rows + n_rows, sizeof(float) * (size_t) m->n_embd)) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory for the MTP head's queue (%d tokens and %d more)",
                          m->n_tokens, n_tokens);
    }
    return PYMOE_OK;
}

/* Tokens that joined the sequence (room reserved); drafted: the head drafted them (its accepted drafts and
 * the token after them), so no entry proposing one of them is a fair test. */
void pymoe_mtp_add_tokens(struct pymoe_mtp * m, const pymoe_token * tokens, int32_t n, bool drafted) {
    memcpy(m->tokens + m->n_tokens, tokens, sizeof(*tokens) * (size_t) n);
    m->n_tokens += n;
    if (drafted && n > 0) {
        m->tested_from = m->n_tokens - 1;
    }
}

/* The target's last decode began at position first and evaluated tokens of
 * the sequence at its batch indices 0..n-1: their hidden states join the
 * queue (those it has already are skipped: a restore evaluates tokens again).
 * Room reserved. */
int32_t pymoe_mtp_add_rows(struct pymoe_mtp * m, int32_t first, int32_t n) {
    const int32_t next = m->pos - 1 + m->n_rows;  /* the position whose row comes next */
    if (first > next) {
        return pymoe_fail(PYMOE_ESTATE, "internal error: the MTP head misses the hidden states of positions "
                          "%d..%d", next, first - 1);
    }
    for (int32_t i = next - first; i < n; i++) {
        const float * h = pymoe_nextn_row(m->target->ctx, i);
        if (!h) {
            return pymoe_fail(PYMOE_EBACKEND, "llama.cpp kept no hidden state for position %d", first + i);
        }
        memcpy(m->rows + (size_t) m->n_rows * m->n_embd, h, sizeof(float) * (size_t) m->n_embd);
        m->n_rows += 1;
    }
    return PYMOE_OK;
}

/* Decode entries (tokens[i], h[i]) at positions pos..; the last one's logits and hidden state are kept, and
 * the logits of entries [test_from, test_to) (acceptance tests). */
static int32_t decode(struct pymoe_mtp * m, const pymoe_token * tokens, const float * h, int32_t n, int32_t pos,
                      int32_t test_from, int32_t test_to) {
    llama_batch_ext_clear(m->batch);
    for (int32_t i = 0; i < n; i++) {
        const llama_pos  p   = pos + i;
        struct llama_embd row = { h + (size_t) i * m->n_embd, 1, (size_t) m->n_embd };
        int32_t          at  = llama_batch_ext_add_token(m->batch, 0, tokens[i]);
        const bool       out = i == n - 1 || (i >= test_from && i < test_to);
        if (at != i || !llama_batch_ext_set_pos(m->batch, at, &p) || !llama_batch_ext_set_embd_token(m->batch, at, row) ||
            !llama_batch_ext_set_output_logits(m->batch, at, out)) {
            return pymoe_fail(PYMOE_EBACKEND, "could not build the MTP head's batch (%d entries)", n);
        }
    }
    pymoe_llama_clear_error();
    struct pymoe_expert_cache * cache = m->target->model->cache;
    pymoe_expert_cache_begin(cache, m->watch);
    int32_t rc = llama_process(m->ctx, LLAMA_PROCESS_TYPE_DECODE, m->batch);
    pymoe_expert_cache_end(cache, m->ctx, m->watch, rc == 0, &m->target->cache_stats);
    if (rc != 0) {
        const char * why = pymoe_llama_last_error();
        return pymoe_fail(rc == 1 ? PYMOE_ECONTEXT : PYMOE_EBACKEND, "the MTP head's decode failed (%d) at position "
                          "%d: %s", rc, pos, why[0] ? why : "(no message)");
    }
    m->out = n - 1;
    return PYMOE_OK;
}

/* The entries whose hidden states are known, in batches, but the last
 * `keep` tokens; on success the queue starts at the first token left.
 * tests (NULL: none): entry j proposes what follows tokens[j], so where
 * that token is known (in the queue) the entry is a greedy acceptance test
 * of a first draft; the last few such entries are read (each reads a row of
 * the output matrix: a plain stretch is learned from, not paid for). */
enum { MTP_TESTS = 8 };

static int32_t catch_up(struct pymoe_mtp * m, int32_t keep, int32_t * evaluated, struct pymoe_mtp_tests * tests) {
    int32_t n  = m->n_tokens - keep < m->n_rows ? m->n_tokens - keep : m->n_rows;
    n          = n > 0 ? n : 0;
    *evaluated = n;
    const int32_t known = n < m->n_tokens - 1 ? n : m->n_tokens - 1;  /* entries whose next token is queued */
    int32_t       from  = tests && known > MTP_TESTS ? known - MTP_TESTS : tests ? 0 : known;
    from                = from > m->tested_from ? from : m->tested_from < known ? m->tested_from : known;
    for (int32_t done = 0; done < n;) {
        int32_t chunk = n - done < m->target->n_batch ? n - done : m->target->n_batch;
        int32_t rc    = decode(m, m->tokens + done, m->rows + (size_t) done * m->n_embd, chunk, m->pos + done,
                               from - done, known - done);
        for (int32_t j = from > done ? from : done; rc == PYMOE_OK && j < known && j < done + chunk; j++) {
            const float * row = llama_get_logits_ith(m->ctx, j - done);
            rc = row ? PYMOE_OK : pymoe_fail(PYMOE_EBACKEND, "the MTP head returned no logits for entry %d", j);
            tests->tests += row != NULL;
            tests->passed += row && pymoe_argmax(row, tests->n_common) == m->tokens[j + 1];
        }
        if (rc != PYMOE_OK) {
            llama_memory_seq_rm(m->mem, 0, m->pos, -1);
            return rc;
        }
        done += chunk;
    }
    m->pos += n;
    m->n_tokens -= n;
    m->n_rows -= n;
    m->tested_from = m->tested_from > n ? m->tested_from - n : 0;
    memmove(m->tokens, m->tokens + n, sizeof(*m->tokens) * (size_t) m->n_tokens);
    memmove(m->rows, m->rows + (size_t) n * m->n_embd, sizeof(float) * (size_t) m->n_rows * m->n_embd);
    return PYMOE_OK;
}

/* Catch up on all but the newest token (a prefill, or a long backlog after
 * plain rounds): a round's first draft then evaluates only what it must. */
int32_t pymoe_mtp_catch_up(struct pymoe_mtp * m, int32_t * evaluated, struct pymoe_mtp_tests * tests) {
    return catch_up(m, 1, evaluated, tests);
}

/* Tokens waiting for the head (plain rounds add one each). */
int32_t pymoe_mtp_backlog(const struct pymoe_mtp * m) { return m->n_tokens; }

/* The first draft's logits (n_vocab), from the newest token's entry, after
 * catching up; *logits is NULL when the newest token has no hidden state
 * yet (the target evaluates it again after a restore). */
int32_t pymoe_mtp_first(struct pymoe_mtp * m, const float ** logits, int32_t * evaluated,
                        struct pymoe_mtp_tests * tests) {
    *logits = NULL;
    int32_t rc = catch_up(m, 0, evaluated, tests);
    if (rc != PYMOE_OK || m->n_tokens > 0 || *evaluated == 0) {
        return rc;
    }
    m->n_drafted = 0;
    *logits      = llama_get_logits_ith(m->ctx, m->out);
    return *logits ? PYMOE_OK : pymoe_fail(PYMOE_EBACKEND, "the MTP head returned no logits");
}

/* The head on its own output: draft d (just proposed) with the hidden state
 * that proposed it; the logits of the draft after it. */
int32_t pymoe_mtp_next(struct pymoe_mtp * m, pymoe_token d, const float ** logits) {
    const float * h = pymoe_nextn_row(m->ctx, m->out);
    if (!h) {
        return pymoe_fail(PYMOE_EBACKEND, "the MTP head kept no hidden state for its draft");
    }
    int32_t rc = decode(m, &d, h, 1, m->pos + m->n_drafted, 0, 0);
    if (rc != PYMOE_OK) {
        return rc;
    }
    m->n_drafted += 1;
    *logits = llama_get_logits_ith(m->ctx, m->out);
    return *logits ? PYMOE_OK : pymoe_fail(PYMOE_EBACKEND, "the MTP head returned no logits");
}

/* Drop the entries the drafts added: the next catch-up writes those
 * positions from the target's hidden states. */
int32_t pymoe_mtp_drop_drafts(struct pymoe_mtp * m) {
    if (m->n_drafted > 0 && !llama_memory_seq_rm(m->mem, 0, m->pos, -1)) {
        return pymoe_fail(PYMOE_EBACKEND, "the MTP head's cache could not drop its drafts");
    }
    m->n_drafted = 0;
    return PYMOE_OK;
}

/* Where the head's record of the sequence ends: its evaluated entries and
 * the tokens waiting in its queue (the loop checks it against the sequence). */
int32_t pymoe_mtp_position(const struct pymoe_mtp * m) { return m->pos + m->n_tokens; }

/* A rewind of the loop. Entry p is made of tokens up to p only, so the
 * entries before n_keep stay. When the cut falls in the queue, its tokens and
 * hidden states past the cut go; when it falls among the evaluated entries,
 * those past it go and the queue is empty: the newest token's entry is
 * there already, and the row after it (its hidden state, which the target
 * has not computed yet) comes with the next verify batch, as usual. */
int32_t pymoe_mtp_rewind(struct pymoe_mtp * m, int32_t n_keep) {
    m->n_drafted = 0;
    if (n_keep > m->pos) {
        m->n_tokens    = n_keep - m->pos;
        m->n_rows      = m->n_rows < m->n_tokens ? m->n_rows : m->n_tokens;
        m->tested_from = m->tested_from < m->n_tokens ? m->tested_from : m->n_tokens;
        return PYMOE_OK;
    }
    if (!llama_memory_seq_rm(m->mem, 0, n_keep, -1)) {
        return pymoe_fail(PYMOE_EBACKEND, "the MTP head's cache could not drop positions from %d on", n_keep);
    }
    m->pos         = n_keep;
    m->tested_from = 0;
    m->n_tokens    = 0;
    m->n_rows   = 0;
    m->out      = -1;
    return PYMOE_OK;
}

/* The head's state, for a loop's state: where it stands, its queue (tokens
 * and hidden states) and its context's cache, as llama.cpp saves it. */
struct mtp_state_header {
    int32_t  pos, n_tokens, n_rows, n_embd;
    uint64_t n_data;
};

size_t pymoe_mtp_state_size(const struct pymoe_mtp * m) {
    return sizeof(struct mtp_state_header) + sizeof(*m->tokens) * (size_t) m->n_tokens +
           sizeof(float) * (size_t) m->n_rows * m->n_embd + llama_state_seq_get_size(m->ctx, 0);
}

int32_t pymoe_mtp_state_save(struct pymoe_mtp * m, uint8_t * buf, size_t size) {
    const struct mtp_state_header h = { m->pos, m->n_tokens, m->n_rows, m->n_embd,
                                        llama_state_seq_get_size(m->ctx, 0) };
    const size_t n_tok = sizeof(*m->tokens) * (size_t) m->n_tokens;
    const size_t n_row = sizeof(float) * (size_t) m->n_rows * m->n_embd;
    if (size != sizeof(h) + n_tok + n_row + h.n_data) {
        return pymoe_fail(PYMOE_EINVAL, "internal error: the MTP head's state changed size while saved");
    }
    memcpy(buf, &h, sizeof(h));
    memcpy(buf + sizeof(h), m->tokens, n_tok);
    memcpy(buf + sizeof(h) + n_tok, m->rows, n_row);
    if (llama_state_seq_get_data(m->ctx, buf + sizeof(h) + n_tok + n_row, h.n_data, 0) != h.n_data) {
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp could not save the MTP head's cache");
    }
    return PYMOE_OK;
}

int32_t pymoe_mtp_state_load(struct pymoe_mtp * m, const uint8_t * buf, size_t size, const pymoe_token * seq,
                             int32_t n_seq) {
    struct mtp_state_header h;
    if (size < sizeof(h)) {
        return pymoe_fail(PYMOE_EINVAL, "the saved state is damaged: the MTP head's part is %zu bytes", size);
    }
    memcpy(&h, buf, sizeof(h));
    /* its queue is the sequence's end; its rows reach the target's position (the next verify batch's first) */
    const int32_t target_pos = m->target->pos;
    const bool sane = h.n_embd == m->n_embd && h.pos >= 0 && h.pos <= n_seq && h.n_tokens == n_seq - h.pos &&
                      h.n_rows <= h.n_tokens + 1 && h.pos - 1 + h.n_rows >= target_pos;
    const size_t n_tok = sane ? sizeof(*m->tokens) * (size_t) h.n_tokens : 0;
    const size_t n_row = sane ? sizeof(float) * (size_t) h.n_rows * (size_t) m->n_embd : 0;
    const size_t room  = size - sizeof(h);  /* no sum of untrusted sizes: it could wrap */
    if (!sane || n_tok > room || n_row > room - n_tok || h.n_data != room - n_tok - n_row ||
        memcmp(buf + sizeof(h), seq + h.pos, n_tok) != 0) {
        return pymoe_fail(PYMOE_EINVAL, "the saved state is damaged: the MTP head's part does not fit its sequence");
    }
    int32_t rc = pymoe_mtp_reserve(m, h.n_tokens - m->n_tokens, h.n_rows - m->n_rows);
    if (rc != PYMOE_OK) {
        return rc;
    }
    llama_memory_clear(m->mem, true);
    pymoe_llama_clear_error();
    if (h.n_data > 0 && llama_state_seq_set_data(m->ctx, buf + sizeof(h) + n_tok + n_row, h.n_data, 0) != h.n_data) {
        const char * why = pymoe_llama_last_error();
        pymoe_mtp_clear(m);
        return pymoe_fail(PYMOE_EBACKEND, "llama.cpp rejected the MTP head's saved cache: %s",
                          why[0] ? why : "(no message)");
    }
    if (llama_memory_seq_pos_max(m->mem, 0) != h.pos - 1) {  /* its cache holds exactly the evaluated entries */
        pymoe_mtp_clear(m);
        return pymoe_fail(PYMOE_EINVAL, "the saved state is damaged: the MTP head's cache does not end at %d", h.pos);
    }
    memcpy(m->tokens, buf + sizeof(h), n_tok);
    memcpy(m->rows, buf + sizeof(h) + n_tok, n_row);
    m->pos         = h.pos;
    m->n_tokens    = h.n_tokens;
    m->n_rows      = h.n_rows;
    m->out         = -1;
    m->n_drafted   = 0;
    m->tested_from = h.n_tokens;  /* who drafted the queued tokens is not saved */
    return PYMOE_OK;
}
