/* grammar.cpp - a GBNF grammar that constrains what is sampled: llama.cpp's
 * grammar sampler (libllama), set up as llama.cpp's chat code sets it up for
 * a tool call (lazy until a trigger word, pattern or token; advanced past the
 * generation prompt the template already wrote).
 *
 * The grammar only masks: a caller samples as usual, asks whether the grammar
 * allows the token (one candidate: cheap), and masks the whole row and samples
 * again only when it does not. That draws from the masked distribution: a
 * token t the grammar allows comes p(t) + (1 - Z) p(t) / Z = p(t) / Z. */
#include "internal.h"

#include "common.h"  /* regex_escape, common_grammar_trigger_type */
#include "json.h"

#include <cctype>
#include <cmath>
#include <new>
#include <string>
#include <vector>

struct pymoe_grammar {
    llama_sampler *               sampler = nullptr;
    const llama_vocab *           vocab   = nullptr;  /* the model's: the grammar is freed before its model */
    int32_t                       n_vocab = 0;
    std::vector<llama_token_data> row;  /* the candidates of a whole-row mask, kept between calls */

    ~pymoe_grammar() {
        if (sampler) {
            llama_sampler_free(sampler);
        }
    }
};

namespace {

template <typename F> int32_t grammar_call(const char * what, F body) {
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
    int32_t rc = grammar_call("the grammar", [&] {
        const common_json spec = common_json::parse(spec_json);
        const std::string gbnf = spec.value("grammar", std::string());
        if (gbnf.empty()) {
            throw std::invalid_argument("no grammar");
        }
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
    return grammar_call("the grammar", [&] {
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
    return grammar_call("the grammar", [&] {
        grammar->row.resize(n_vocab);
        for (int32_t i = 0; i < n_vocab; i++) {
            grammar->row[i] = {i, logits[i], 0.0f};
        }
        llama_token_data_array candidates = {grammar->row.data(), (size_t) n_vocab, -1, false};
        llama_sampler_apply(grammar->sampler, &candidates);
        for (size_t i = 0; i < candidates.size; i++) {  /* the sampler only lowers logits, in place */
            logits[candidates.data[i].id] = candidates.data[i].logit;
        }
    });
}

int32_t pymoe_grammar_accept(pymoe_grammar * grammar, pymoe_token token) {
    if (!grammar) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_grammar_accept: grammar must not be NULL");
    }
    if (token < 0 || token >= grammar->n_vocab) {
        return pymoe_fail(PYMOE_ETOKEN, "token %d is outside the vocabulary (0..%d)", token, grammar->n_vocab - 1);
    }
    return grammar_call("the grammar", [&] { llama_sampler_accept(grammar->sampler, token); });
}

}  // extern "C"
