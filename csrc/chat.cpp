/* chat.cpp - chat templates with tools and reasoning, through llama.cpp's
 * chat library (common/chat.h: Jinja templates, per-family tool-call and
 * thinking parsers, tool-call grammars), behind a C API that speaks JSON.
 *
 * That library is maintained with the templates it parses, so pymoe uses it
 * rather than keeping parsers of its own. Everything it throws (a template
 * that does not parse or that raises, a malformed request, output the
 * model's format does not match) becomes PYMOE_EINVAL with its message; its
 * asserts are turned into errors by the guard (llama_guard.cpp). A template is
 * part of the untrusted model file: pymoe's patch of the Jinja engine makes
 * too deep a recursion, too long a render and too large a string errors. */
#include "cpp_call.h"

#include "chat.h"
#include "jinja/runtime.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

struct pymoe_chat {
    common_chat_templates_ptr templates;
};

struct pymoe_chat_parser {
    common_chat_parser_params params;
};

namespace {

/* A chat template comes with the model file: a call that renders it (opening one renders it a few dozen
 * times to learn its format) may take this long before it is an error (patches/0002-jinja-limits.patch). */
const double TEMPLATE_SECONDS = 10.0;

void time_limit(double seconds) {
#ifdef PYMOE_JINJA_LIMITS
    jinja::set_time_limit(seconds);
#else
    (void) seconds;  /* a llama.cpp without pymoe's patch: no limit (CMake warned) */
#endif
}

/* body() through pymoe_cpp_call, with the template time limit on this thread while it runs */
template <typename F> int32_t chat_call(const char * what, F body) {
    return pymoe_cpp_call(what, [&] {
        struct no_limit_after {
            ~no_limit_after() { time_limit(0); }
        } after;
        time_limit(TEMPLATE_SECONDS);
        body();
    });
}

char * copy_out(const std::string & text) {
    char * out = static_cast<char *>(std::malloc(text.size() + 1));
    if (out) {
        std::memcpy(out, text.c_str(), text.size() + 1);
    }
    return out;
}

/* text (JSON made inside the guarded call: dump_safe replaces bytes that are not UTF-8, which a template's
 * byte slicing or a model's tokens can make) as the caller's copy */
int32_t give(const std::string & text, char ** out) {
    *out = copy_out(text);
    return *out ? pymoe_ok() : pymoe_fail(PYMOE_ENOMEM, "out of memory for a chat result");
}

common_reasoning_format reasoning_format(const common_json & request) {
    return common_reasoning_format_from_name(request.value("reasoning_format", std::string("auto")));
}

}  // namespace

extern "C" {

int32_t pymoe_chat_open(const pymoe_model * model, const char * template_source, pymoe_chat ** out) {
    if (!model || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_chat_open: model and out must not be NULL");
    }
    *out = nullptr;
    auto * chat = new (std::nothrow) pymoe_chat();
    if (!chat) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory for a chat template");
    }
    int32_t rc = chat_call("the chat template", [&] {
        /* parsed here first: the library reports a template that does not parse without its reason */
        const char * source = template_source && *template_source ? template_source
                                                                   : llama_model_chat_template(model->llama, nullptr);
        if (source && std::string(source) != "chatml") {
            jinja::lexer lexer;
            jinja::parse_from_tokens(lexer.tokenize(source));
        }
        chat->templates = common_chat_templates_init(model->llama, template_source ? template_source : "");
    });
    if (rc != PYMOE_OK) {
        delete chat;
        return rc;
    }
    *out = chat;
    return PYMOE_OK;
}

void pymoe_chat_free(pymoe_chat * chat) { delete chat; }

void pymoe_chat_text_free(char * text) { std::free(text); }

int32_t pymoe_chat_caps(const pymoe_chat * chat, char ** out) {
    if (!chat || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_chat_caps: chat and out must not be NULL");
    }
    std::string text;
    int32_t rc = chat_call("the chat template's capabilities", [&] {
        common_json caps = common_json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(chat->templates.get())) {
            caps[name] = value;
        }
        caps["supports_enable_thinking"] = common_chat_templates_support_enable_thinking(chat->templates.get());
        caps["source"] = common_chat_templates_source(chat->templates.get());
        text = caps.dump_safe();
    });
    return rc == PYMOE_OK ? give(text, out) : rc;
}

int32_t pymoe_chat_render(const pymoe_chat * chat, const char * request_json, char ** out) {
    if (!chat || !request_json || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_chat_render: chat, request_json and out must not be NULL");
    }
    std::string text;
    int32_t rc = chat_call("the chat template", [&] {
        const common_json request = common_json::parse(request_json);
        common_chat_templates_inputs inputs;
        inputs.messages = common_chat_msgs_parse_oaicompat(request.at("messages"));
        if (request.contains("tools") && !request.at("tools").is_null()) {
            inputs.tools = common_chat_tools_parse_oaicompat(request.at("tools"));
        }
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(request.value("tool_choice", std::string("auto")));
        inputs.parallel_tool_calls = request.value("parallel_tool_calls", false);
        inputs.add_generation_prompt = request.value("add_generation_prompt", true);
        inputs.reasoning_format = reasoning_format(request);
        inputs.enable_thinking = request.value("enable_thinking", true);
        if (request.contains("json_schema") && !request.at("json_schema").is_null()) {  /* a response format */
            inputs.json_schema = request.at("json_schema").dump();
        }
        if (request.contains("chat_template_kwargs")) {
            for (const auto & [key, value] : request.at("chat_template_kwargs").items()) {
                inputs.chat_template_kwargs[key] = value.dump();  /* the library takes each value as JSON text */
            }
        }
        const common_chat_params params = common_chat_templates_apply(chat->templates.get(), inputs);
        common_json triggers = common_json::array();
        for (const auto & trigger : params.grammar_triggers) {
            common_json t = common_json::object();
            t["type"] = (int) trigger.type;
            t["value"] = trigger.value;
            t["token"] = (int) trigger.token;
            triggers.push_back(t);
        }
        common_json preserved = common_json::array();
        for (const auto & token : params.preserved_tokens) {
            preserved.push_back(token);
        }
        common_json stops = common_json::array();
        for (const auto & stop : params.additional_stops) {
            stops.push_back(stop);
        }
        common_json result = common_json::object();
        result["prompt"] = params.prompt;
        result["format"] = (int) params.format;
        result["format_name"] = common_chat_format_name(params.format);
        result["grammar"] = params.grammar;
        result["grammar_lazy"] = params.grammar_lazy;
        result["grammar_triggers"] = triggers;
        result["preserved_tokens"] = preserved;
        result["additional_stops"] = stops;
        result["generation_prompt"] = params.generation_prompt;
        result["supports_thinking"] = params.supports_thinking;
        result["parser"] = params.parser;
        text = result.dump_safe();
    });
    return rc == PYMOE_OK ? give(text, out) : rc;
}

int32_t pymoe_chat_parser_create(const char * syntax_json, pymoe_chat_parser ** out) {
    if (!syntax_json || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_chat_parser_create: syntax_json and out must not be NULL");
    }
    *out = nullptr;
    auto * parser = new (std::nothrow) pymoe_chat_parser();
    if (!parser) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory for a chat parser");
    }
    int32_t rc = chat_call("the chat parser", [&] {
        const common_json syntax = common_json::parse(syntax_json);
        common_chat_parser_params & params = parser->params;
        const int format = syntax.value("format", 0);
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            throw std::invalid_argument("unknown chat format " + std::to_string(format));
        }
        params.format = (common_chat_format) format;  /* what to parse comes from the render's request */
        params.generation_prompt = syntax.value("generation_prompt", std::string());
        const std::string arena = syntax.value("parser", std::string());
        if (!arena.empty()) {
            params.parser.load(arena);
        }
    });
    if (rc != PYMOE_OK) {
        delete parser;
        return rc;
    }
    *out = parser;
    return PYMOE_OK;
}

void pymoe_chat_parser_free(pymoe_chat_parser * parser) { delete parser; }

int32_t pymoe_chat_parse(const pymoe_chat_parser * parser, const char * text, bool partial, char ** out) {
    if (!parser || !text || !out) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_chat_parse: parser, text and out must not be NULL");
    }
    std::string json;
    int32_t rc = chat_call("the model's output", [&] {
        json = common_chat_parse(text, partial, parser->params).to_json_oaicompat().dump_safe();
    });
    return rc == PYMOE_OK ? give(json, out) : rc;
}

}  // extern "C"
