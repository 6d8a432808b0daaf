/* grammar.cpp - a GBNF grammar that constrains what is sampled: llama.cpp's
 * grammar sampler (libllama), set up as llama.cpp's chat code sets it up for
 * a tool call (lazy until a trigger word, pattern or token; advanced past the
 * generation prompt the template already wrote).
 *
 * The constrained distribution (constrained_dist) is what plain sampling
 * draws from and what the speculative loop verifies against: the tokens the
 * sampling transforms keep that the grammar allows, renormalized (a check of
 * those few tokens); when none of them is allowed, the transforms of the row
 * with the forbidden tokens masked, found among the most likely tokens where
 * it can be (masked_from_top) and by masking the whole row otherwise. */
#include "cpp_call.h"

#include "common.h"  /* regex_escape, common_grammar_trigger_type */
#include "json-schema-to-grammar.h"
#include "json.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <vector>

struct pymoe_grammar {
    llama_sampler *               sampler = nullptr;
    const llama_vocab *           vocab   = nullptr;  /* the model's: the grammar is freed before its model */
    int32_t                       n_vocab = 0;
    std::vector<llama_token_data> row;     /* the candidates of a check or a mask, kept between calls */
    std::vector<float>            masked;  /* a logits row masked whole (the rare fallback of a draw) */
    std::vector<uint8_t>          scratch; /* sampling scratch for pymoe_grammar_sample and _probs */

    ~pymoe_grammar() {
        if (sampler) {
            llama_sampler_free(sampler);
        }
    }
};

namespace {

/* a trigger of llama.cpp's chat code as the regular expression or token the grammar sampler takes */
void add_trigger(const common_json & trigger, std::vector<std::string> & patterns, std::vector<llama_token> & tokens) {
    const int type = trigger.value("type", -1);
    const std::string value = trigger.value("value", std::string());
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
            tokens.push_back(trigger.value("token", -1));
            break;
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
            patterns.push_back(regex_escape(value));
            break;
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
            patterns.push_back(value);
            break;
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL:  /* the whole text: anchored at both ends */
            patterns.push_back(value.empty() ? "^$"
                                             : (value.front() != '^' ? "^" : "") + value + (value.back() != '$' ? "$" : ""));
            break;
        default:
            throw std::invalid_argument("unknown grammar trigger type " + std::to_string(type));
    }
}

/* llama.cpp's grammar code recurses once per nested group when it parses,
 * and once per rule along a chain of leading references when it advances:
 * a grammar from a request must not reach the end of the thread's stack
 * (100,000 nested groups, or a chain of 100,000 rules, did). Both are
 * bounded here, before llama.cpp reads the text: groups nest at most
 * MAX_NESTING deep and a grammar has at most MAX_RULES rules, so a chain is
 * at most their sum long (a few thousand frames; 20,000 ran). */
const int MAX_NESTING = 200, MAX_RULES = 5000;

void check_shape(const std::string & gbnf) {
    int depth = 0, deepest = 0, rules = 0;
    for (size_t i = 0; i < gbnf.size(); i++) {
        const char c = gbnf[i];
        if (c == '#') {  /* a comment, to the end of the line */
            while (i < gbnf.size() && gbnf[i] != '\n' && gbnf[i] != '\r') {
                i++;
            }
        } else if (c == '"' || c == '[') {  /* a literal or a character class: skip it, escapes too */
            const char end = c == '"' ? '"' : ']';
            for (i++; i < gbnf.size() && gbnf[i] != end; i++) {
                i += gbnf[i] == '\\';
            }
        } else if (c == '(') {
            deepest = std::max(deepest, ++depth);
        } else if (c == ')') {
            depth--;
        } else if (c == ':' && gbnf.compare(i, 3, "::=") == 0) {
            rules++;
        }
    }
    if (deepest > MAX_NESTING) {
        throw std::invalid_argument("the grammar nests groups " + std::to_string(deepest) + " deep; at most " +
                                    std::to_string(MAX_NESTING));
    }
    if (rules > MAX_RULES) {
        throw std::invalid_argument("the grammar has " + std::to_string(rules) + " rules; at most " +
                                    std::to_string(MAX_RULES));
    }
}

/* How deep a JSON value nests, without recursing: the schema converter
 * recurses once per level (a schema 100,000 levels deep ended the process). */
size_t json_depth(const common_json & value) {
    std::vector<std::pair<const common_json *, size_t>> todo = { { &value, 1 } };
    size_t deepest = 0;
    while (!todo.empty()) {
        const auto [at, depth] = todo.back();
        todo.pop_back();
        deepest = std::max(deepest, depth);
        if (at->is_object() || at->is_array()) {
            for (const auto & item : *at) {
                todo.push_back({ &item, depth + 1 });
            }
        }
    }
    return deepest;
}

/* Which of the n candidates the grammar allows now: their logits become -inf where it does not (one pass of
 * llama.cpp's grammar over them, in place, order kept). */
void check_candidates(pymoe_grammar * g, const pymoe_candidate * c, int32_t n) {
    g->row.resize(n);
    for (int32_t i = 0; i < n; i++) {
        g->row[i] = { c[i].id, 0.0f, 0.0f };
    }
    llama_token_data_array candidates = { g->row.data(), (size_t) n, -1, false };
    llama_sampler_apply(g->sampler, &candidates);
}

/* The row with every token the grammar does not allow at -inf, into out (which may be the row itself). */
void mask_into(pymoe_grammar * g, const float * logits, int32_t n_vocab, float * out) {
    g->row.resize(n_vocab);
    for (int32_t i = 0; i < n_vocab; i++) {
        g->row[i] = { i, logits[i], 0.0f };
    }
    llama_token_data_array candidates = { g->row.data(), (size_t) n_vocab, -1, false };
    llama_sampler_apply(g->sampler, &candidates);
    for (size_t i = 0; i < candidates.size; i++) {  /* the sampler only lowers logits, in place */
        out[candidates.data[i].id] = candidates.data[i].logit;
    }
}

/* The masked row in g->masked; an error when the grammar allows no token. */
void mask_row(pymoe_grammar * g, const float * logits, int32_t n_vocab) {
    g->masked.resize(n_vocab);
    mask_into(g, logits, n_vocab, g->masked.data());
    bool any = false;
    for (int32_t i = 0; i < n_vocab && !any; i++) {
        any = g->masked[i] > -INFINITY;
    }
    if (!any) {
        throw std::invalid_argument("the grammar allows no token here");
    }
}

/* The masked row's distribution without masking all of it, where it needs
 * only the `need` most likely allowed tokens (greedy: 1; top-k: k): the
 * most likely tokens are checked in growing numbers until `need` of them are
 * allowed; nothing outside them can then be among the masked row's top
 * `need`, so the row with only those left is transformed alike. A whole-row
 * mask costs 50 ms at a 152k vocabulary (bench/results/constrained.md);
 * the first few hundred tokens hold the allowed ones in most rows. False:
 * fewer than `need` among all but the whole row, which is masked then. */
bool masked_from_top(pymoe_grammar * g, const float * logits, int32_t n_vocab, const pymoe_sampling_params * params,
                     int32_t need, pymoe_candidate * c, int32_t * n) {
    for (int32_t m = need * 64; m < n_vocab / 4; m *= 8) {
        if (pymoe_top_candidates(logits, n_vocab, m, c) != PYMOE_OK) {
            return false;  /* not numbers: found again by the caller's pass */
        }
        check_candidates(g, c, m);
        int32_t allowed = 0;
        for (int32_t i = 0; i < m; i++) {
            allowed += std::isfinite(g->row[i].logit);
        }
        if (allowed < need) {
            continue;
        }
        if (params->temperature == 0.0f) {
            int32_t i = 0;
            while (!std::isfinite(g->row[i].logit)) {
                i++;
            }
            c[0] = { c[i].id, c[i].logit, 1.0f };
            *n   = 1;
            return true;
        }
        g->masked.assign(n_vocab, -INFINITY);
        for (int32_t i = 0; i < m; i++) {
            if (std::isfinite(g->row[i].logit)) {
                g->masked[c[i].id] = c[i].logit;
            }
        }
        *n = pymoe_sampling_transform(g->masked.data(), n_vocab, params, c);
        return true;
    }
    return false;
}

/* The constrained distribution (pymoe.h). The common case costs one check
 * of the few tokens the transforms keep; only when the grammar allows none
 * of them is the whole row masked and transformed again. Returns a
 * PYMOE_ROW_* value for a row that is not numbers (or all -inf). */
int32_t constrained_dist(pymoe_grammar * g, const float * logits, int32_t n_vocab, const pymoe_sampling_params * params,
                         pymoe_candidate * c, int32_t * n) {
    if (params->temperature == 0.0f) {
        pymoe_token top = pymoe_argmax(logits, n_vocab);
        if (top < 0) {
            return top;
        }
        c[0] = { top, logits[top], 1.0f };
        check_candidates(g, c, 1);
        if (!std::isfinite(g->row[0].logit) && !masked_from_top(g, logits, n_vocab, params, 1, c, n)) {
            mask_row(g, logits, n_vocab);
            top  = pymoe_argmax(g->masked.data(), n_vocab);
            c[0] = { top, logits[top], 1.0f };
        }
        *n = 1;
        return PYMOE_OK;
    }
    const int32_t kept = pymoe_sampling_transform(logits, n_vocab, params, c);
    if (kept < 0) {
        return kept;
    }
    check_candidates(g, c, kept);
    int32_t m    = 0;
    double  mass = 0.0;
    for (int32_t i = 0; i < kept; i++) {
        if (std::isfinite(g->row[i].logit) && c[i].p > 0.0f) {
            mass += c[i].p;
            c[m++] = c[i];
        }
    }
    if (mass > 0.0) {
        for (int32_t i = 0; i < m; i++) {
            c[i].p = (float) (c[i].p / mass);
        }
        *n = m;
        return PYMOE_OK;
    }
    const bool top_k = params->top_k > 0 && params->top_k < n_vocab;
    if (!top_k || !masked_from_top(g, logits, n_vocab, params, params->top_k, c, n)) {
        mask_row(g, logits, n_vocab);
        *n = pymoe_sampling_transform(g->masked.data(), n_vocab, params, c);
    }
    return PYMOE_OK;
}

pymoe_candidate * sampling_scratch(pymoe_grammar * g, int32_t n_vocab) {
    g->scratch.resize(PYMOE_SAMPLING_SCRATCH(n_vocab));
    return reinterpret_cast<pymoe_candidate *>(g->scratch.data());
}

/* A public call's row through the constrained distribution, into the grammar's own scratch (*c). */
int32_t public_dist(pymoe_grammar * g, const float * logits, int32_t n_vocab, const pymoe_sampling_params * params,
                    pymoe_candidate ** c, int32_t * n) {
    int32_t row = PYMOE_OK;
    int32_t rc  = pymoe_cpp_call("the grammar", [&] {
        *c  = sampling_scratch(g, n_vocab);
        row = constrained_dist(g, logits, n_vocab, params, *c, n);
    });
    return rc == PYMOE_OK && row != PYMOE_OK ? pymoe_row_fail(row, "the logits") : rc;
}

/* A public call's checks: the grammar, a row of its vocabulary, the params in this build's layout. */
int32_t row_in(const char * what, pymoe_grammar * g, const float * logits, int32_t n_vocab,
               const pymoe_sampling_params ** params, pymoe_sampling_params * local) {
    if (!g || !logits || n_vocab != (g ? g->n_vocab : 0)) {
        return pymoe_fail(PYMOE_EINVAL, "%s: needs a grammar and a logits row of its vocabulary's size (%d), got %d",
                          what, g ? g->n_vocab : 0, n_vocab);
    }
    return pymoe_sampling_params_in(*params, local, params);
}

}  // namespace

extern "C" {

int32_t pymoe_grammar_create(const pymoe_model * model, const char * spec_json, pymoe_grammar ** out) {
    if (!model || !spec_json || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_create: model, spec_json and out must not be NULL");
    }
    *out = nullptr;
    auto * g = new (std::nothrow) pymoe_grammar();
    if (!g) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory for a grammar");
    }
    g->vocab = model->vocab;
    g->n_vocab = model->info.n_vocab;
    int32_t rc = pymoe_cpp_call("the grammar", [&] {
        const common_json spec = common_json::parse(spec_json);
        if (!spec.is_object()) {
            throw std::invalid_argument("the spec must be a JSON object");
        }
        if (spec.contains("grammar") == spec.contains("json_schema")) {
            throw std::invalid_argument("give either \"grammar\" (GBNF) or \"json_schema\"");
        }
        std::string gbnf;
        if (spec.contains("json_schema")) {
            const common_json & schema = spec.at("json_schema");
            if (!schema.is_object() && !schema.is_boolean()) {
                throw std::invalid_argument("a JSON schema is an object");
            }
            if (json_depth(schema) > 2 * MAX_NESTING) {  /* a level of schema is an object and its member */
                throw std::invalid_argument("the JSON schema nests deeper than " + std::to_string(2 * MAX_NESTING) +
                                            " levels");
            }
            gbnf = json_schema_to_grammar(schema);
        } else {
            gbnf = spec.at("grammar").get<std::string>();
        }
        if (gbnf.empty()) {
            throw std::invalid_argument("the grammar is empty");
        }
        check_shape(gbnf);
        std::vector<std::string> patterns;
        std::vector<llama_token> tokens;
        if (spec.contains("grammar_triggers")) {
            for (const auto & trigger : spec.at("grammar_triggers")) {
                add_trigger(trigger, patterns, tokens);
            }
        }
        const int32_t n_vocab = model->info.n_vocab;
        for (llama_token t : tokens) {
            if (t < 0 || t >= n_vocab) {
                throw std::invalid_argument("a trigger token is outside the vocabulary");
            }
        }
        const bool lazy = spec.value("grammar_lazy", false);
        if (lazy) {
            std::vector<const char *> c_patterns;
            for (const auto & p : patterns) {
                c_patterns.push_back(p.c_str());
            }
            g->sampler = llama_sampler_init_grammar_lazy_patterns(model->vocab, gbnf.c_str(), "root", c_patterns.data(),
                                                                  c_patterns.size(), tokens.data(), tokens.size());
        } else {
            g->sampler = llama_sampler_init_grammar(model->vocab, gbnf.c_str(), "root");
        }
        if (!g->sampler) {
            throw std::invalid_argument("the grammar does not parse (llama.cpp's log says where)");
        }
        /* a tool call's grammar starts with the generation prompt the template already wrote */
        const std::string prefill = spec.value("generation_prompt", std::string());
        if (!lazy && !prefill.empty()) {
            std::vector<llama_token> prompt(prefill.size() + 8);
            int32_t n = llama_tokenize(model->vocab, prefill.c_str(), (int32_t) prefill.size(), prompt.data(),
                                       (int32_t) prompt.size(), false, true);
            if (n < 0) {
                throw std::invalid_argument("the generation prompt does not tokenize");
            }
            for (int32_t i = 0; i < n; i++) {
                char piece[64];
                int32_t len = llama_token_to_piece(model->vocab, prompt[i], piece, sizeof piece, 0, true);
                /* some tokenizers put a space before a leading special token: not part of the prompt */
                if (i == 0 && len > 0 && std::isspace((unsigned char) piece[0]) && !std::isspace((unsigned char) prefill[0])) {
                    if (len > 1) {  /* a word with a space in front (SentencePiece): the grammar cannot take it */
                        throw std::invalid_argument("this tokenizer does not write the generation prompt without a "
                                                    "space in front, so the grammar cannot follow it");
                    }
                    continue;
                }
                llama_sampler_accept(g->sampler, prompt[i]);
            }
        }
    });
    if (rc != PYMOE_OK) {
        delete g;
        return rc;
    }
    *out = g;
    return PYMOE_OK;
}

void pymoe_grammar_free(pymoe_grammar * grammar) { delete grammar; }

int32_t pymoe_grammar_allows(pymoe_grammar * grammar, pymoe_token token, bool * out) {
    if (!grammar || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_allows: grammar and out must not be NULL");
    }
    if (token < 0 || token >= grammar->n_vocab) {
        return pymoe_fail(PYMOE_ETOKEN, "token %d is outside the vocabulary (0..%d)", token, grammar->n_vocab - 1);
    }
    return pymoe_cpp_call("the grammar", [&] {
        llama_token_data one = {token, 0.0f, 0.0f};
        llama_token_data_array candidates = {&one, 1, -1, false};
        llama_sampler_apply(grammar->sampler, &candidates);
        *out = std::isfinite(one.logit);
    });
}

int32_t pymoe_grammar_mask(pymoe_grammar * grammar, float * logits, int32_t n_vocab) {
    if (!grammar || !logits || n_vocab != grammar->n_vocab) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_mask: needs a grammar and a row of the vocabulary's size (%d)",
                          grammar ? grammar->n_vocab : 0);
    }
    return pymoe_cpp_call("the grammar", [&] { mask_into(grammar, logits, n_vocab, logits); });
}

int32_t pymoe_grammar_accept(pymoe_grammar * grammar, pymoe_token token) {
    if (!grammar) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_accept: grammar must not be NULL");
    }
    if (token < 0 || token >= grammar->n_vocab) {
        return pymoe_fail(PYMOE_ETOKEN, "token %d is outside the vocabulary (0..%d)", token, grammar->n_vocab - 1);
    }
    return pymoe_cpp_call("the grammar", [&] { llama_sampler_accept(grammar->sampler, token); });
}

int32_t pymoe_grammar_sample(pymoe_grammar * grammar, const float * logits, int32_t n_vocab,
                             const struct pymoe_sampling_params * params, uint64_t * rng_state, pymoe_token * out) {
    struct pymoe_sampling_params local;
    int32_t rc = row_in("pymoe_grammar_sample", grammar, logits, n_vocab, &params, &local);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (!out || (params->temperature != 0.0f && !rng_state)) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_sample: out (and a random state when sampling) are required");
    }
    pymoe_candidate * c = nullptr;
    int32_t           n = 0;
    rc                  = public_dist(grammar, logits, n_vocab, params, &c, &n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    const int32_t at = n > 1 ? pymoe_draw(&c[0].p, NULL, n, sizeof(pymoe_candidate) / sizeof(float),
                                          pymoe_rng_uniform(rng_state)) : 0;
    *out = c[at >= 0 ? at : 0].id;
    return pymoe_ok();
}

int32_t pymoe_grammar_probs(pymoe_grammar * grammar, const float * logits, int32_t n_vocab,
                            const struct pymoe_sampling_params * params, float * probs) {
    struct pymoe_sampling_params local;
    int32_t rc = row_in("pymoe_grammar_probs", grammar, logits, n_vocab, &params, &local);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (!probs) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_probs: probs is NULL");
    }
    pymoe_candidate * c = nullptr;
    int32_t           n = 0;
    rc                  = public_dist(grammar, logits, n_vocab, params, &c, &n);
    if (rc != PYMOE_OK) {
        return rc;
    }
    std::memset(probs, 0, sizeof(*probs) * (size_t) n_vocab);
    for (int32_t i = 0; i < n; i++) {
        probs[c[i].id] = c[i].p;
    }
    return pymoe_ok();
}

int32_t pymoe_grammar_dist(pymoe_grammar * g, const float * logits, int32_t n_vocab,
                           const struct pymoe_sampling_params * params, pymoe_candidate * c, int32_t * n) {
    int32_t row = PYMOE_OK;
    int32_t rc  = pymoe_cpp_call("the grammar", [&] { row = constrained_dist(g, logits, n_vocab, params, c, n); });
    return rc == PYMOE_OK ? row : rc;
}

int32_t pymoe_grammar_fork(const pymoe_grammar * g, pymoe_grammar ** out) {
    *out    = nullptr;
    auto * f = new (std::nothrow) pymoe_grammar();
    if (!f) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory for a grammar");
    }
    f->vocab   = g->vocab;
    f->n_vocab = g->n_vocab;
    int32_t rc = pymoe_cpp_call("the grammar", [&] { f->sampler = llama_sampler_clone(g->sampler); });
    if (rc != PYMOE_OK || !f->sampler) {
        delete f;
        return rc != PYMOE_OK ? rc : pymoe_fail(PYMOE_ENOMEM, "out of memory for a grammar");
    }
    *out = f;
    return PYMOE_OK;
}

bool pymoe_grammar_of(const pymoe_grammar * g, const pymoe_model * model) { return g->vocab == model->vocab; }

}  // extern "C"
