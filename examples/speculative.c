/* speculative.c - greedy speculative decoding with libpymoe: a draft model,
 * the target's own MTP head or the context itself proposes, the target
 * verifies.
 *
 *   cc speculative.c -o speculative $(pymoe --cflags --libs)
 *   ./speculative target.gguf draft.gguf "The capital of France is" 64 4
 *   ./speculative target.gguf ngram "1, 2, 3, 4, 1, 2, 3, 4," 64 auto
 *   ./speculative qwen35moe-with-mtp.gguf mtp "The capital of France is" 64 auto
 *
 * The draft "ngram" copies drafts from the context (no draft model); "mtp"
 * drafts with the target's MTP head (a model with nextn layers). The last
 * argument is the draft length k, or "auto". The text streams to stdout; the
 * token ids and the statistics go to stderr. */
#include <pymoe.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct stream {
    pymoe_model * model;
    pymoe_token   ids[4096];
    int32_t       n;
};

static bool on_token(pymoe_token token, void * user_data) {
    struct stream * s = user_data;
    if (s->n < 4096) {
        s->ids[s->n++] = token;
    }
    char    piece[256];
    int32_t len = 0;
    if (pymoe_model_token_piece(s->model, token, false, piece, sizeof(piece), &len) == PYMOE_OK) {
        fwrite(piece, 1, (size_t) len, stdout);
        fflush(stdout);
    }
    return true;
}

static int fail(const char * what, int32_t rc) {
    fprintf(stderr, "%s: %s (%s)\n", what, pymoe_strerror(rc), pymoe_last_error());
    return 1;
}

static int32_t open_session(const char * path, bool mtp, pymoe_model ** model, pymoe_session ** session) {
    struct pymoe_model_params mp;
    pymoe_model_params_default(&mp);
    mp.path    = path;
    mp.mtp     = mtp;  /* load the MTP head too */
    int32_t rc = pymoe_model_load(&mp, model);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct pymoe_session_params sp;
    pymoe_session_params_default(&sp);
    sp.n_ctx = 2048;
    return pymoe_session_create(*model, &sp, session);
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TARGET.gguf DRAFT.gguf|ngram|mtp [PROMPT] [N_TOKENS] [K|auto] [CONSTRAINT]\n"
                        "CONSTRAINT: {\"json_schema\": {...}} or {\"grammar\": \"root ::= ...\"}\n", argv[0]);
        return 2;
    }
    const char * prompt   = argc > 3 ? argv[3] : "Once upon a time";
    int32_t      n_tokens = argc > 4 ? atoi(argv[4]) : 64;
    const char * k        = argc > 5 ? argv[5] : "4";
    const char * spec_json = argc > 6 ? argv[6] : NULL;  /* what the output must follow (NULL: anything) */
    const bool   lookup   = strcmp(argv[2], "ngram") == 0;
    const bool   mtp      = strcmp(argv[2], "mtp") == 0;

    pymoe_model *target = NULL, *draft = NULL;
    pymoe_session *ts = NULL, *ds = NULL;
    pymoe_spec * spec = NULL;
    pymoe_grammar * grammar = NULL;
    int32_t rc = open_session(argv[1], mtp, &target, &ts);
    if (rc == PYMOE_OK && !lookup && !mtp) {
        rc = open_session(argv[2], false, &draft, &ds);
    }
    if (rc == PYMOE_OK) {
        struct pymoe_sampling_params greedy;
        pymoe_sampling_params_default(&greedy);
        greedy.temperature = 0.0f;
        struct pymoe_spec_params params;
        pymoe_spec_params_default(&params);
        params.sampling = &greedy;  /* greedy verification */
        if (strcmp(k, "auto") == 0) {
            params.auto_draft = true;
            params.draft_max  = 8;
        } else {
            params.draft_max = atoi(k);
        }
        if (lookup) {  /* drafts from the context: no draft session */
            params.draft_sources = PYMOE_DRAFT_LOOKUP;
            params.draft_max     = params.auto_draft ? 16 : params.draft_max;
        }
        if (mtp) {  /* the target drafts for itself: no draft session either */
            params.draft_sources = PYMOE_DRAFT_MTP;
        }
        rc = pymoe_spec_create(ts, ds, &params, &spec);
    }
    if (rc == PYMOE_OK && spec_json) {  /* the loop verifies under it: what plain constrained decoding gives */
        rc = pymoe_grammar_create(target, spec_json, &grammar);
        rc = rc == PYMOE_OK ? pymoe_spec_set_grammar(spec, grammar) : rc;
    }
    pymoe_token tokens[512];
    int32_t     n_prompt = 0;
    if (rc == PYMOE_OK) {
        rc = pymoe_model_tokenize(target, prompt, (int32_t) strlen(prompt), true, false, tokens, 512, &n_prompt);
    }
    if (rc == PYMOE_OK) {
        rc = pymoe_spec_feed(spec, tokens, n_prompt);
    }
    struct stream stream = { .model = target, .n = 0 };
    int32_t       n = 0, stop = PYMOE_STOP_NONE;
    if (rc == PYMOE_OK) {
        rc = pymoe_spec_run(spec, n_tokens, on_token, &stream, &n, &stop);
    }
    int status = rc == PYMOE_OK ? 0 : fail("speculative decoding", rc);
    printf("\n");
    if (status == 0) {
        struct pymoe_spec_stats st = { .size = sizeof(st) };
        pymoe_spec_stats(spec, &st);
        fprintf(stderr, "ids:");
        for (int32_t i = 0; i < stream.n; i++) {
            fprintf(stderr, " %d", stream.ids[i]);
        }
        double seconds = st.draft_seconds + st.verify_seconds + st.other_seconds;
        fprintf(stderr, "\n%d tokens in %lld rounds, %lld of %lld drafts accepted, %.1f tokens/s, stop %d\n", n,
                (long long) st.rounds, (long long) st.accepted, (long long) st.drafted,
                seconds > 0 ? n / seconds : 0.0, stop);
    }
    pymoe_spec_free(spec);  /* the loop, then its grammar and sessions, then their models */
    pymoe_grammar_free(grammar);
    pymoe_session_free(ts);
    pymoe_session_free(ds);  /* NULL (lookup or MTP drafts) is a no-op */
    pymoe_model_free(target);
    pymoe_model_free(draft);
    return status;
}
