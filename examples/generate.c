/* generate.c - load a GGUF model with libpymoe and generate greedily.
 *
 *   cc generate.c -o generate $(pymoe --cflags --libs)
 *   ./generate model.gguf "The capital of France is" 32
 *
 * The text goes to stdout as it is generated; the token ids and the speed go
 * to stderr. */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime */
#include <pymoe.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int fail(const char * what, int32_t rc) {
    fprintf(stderr, "%s: %s (%s)\n", what, pymoe_strerror(rc), pymoe_last_error());
    return 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [PROMPT] [N_TOKENS]\n", argv[0]);
        return 2;
    }
    const char * prompt   = argc > 2 ? argv[2] : "Once upon a time";
    int          n_tokens = argc > 3 ? atoi(argv[3]) : 32;

    struct pymoe_model_params mp;
    pymoe_model_params_default(&mp);
    mp.path = argv[1];
    pymoe_model * model = NULL;
    int32_t       rc    = pymoe_model_load(&mp, &model);
    if (rc != PYMOE_OK) {
        return fail("load", rc);
    }

    struct pymoe_session_params sp;
    pymoe_session_params_default(&sp);
    sp.n_ctx = 2048;
    pymoe_session * session = NULL;
    if ((rc = pymoe_session_create(model, &sp, &session)) != PYMOE_OK) {
        pymoe_model_free(model);
        return fail("session", rc);
    }

    pymoe_token prompt_tokens[512];
    int32_t     n_prompt = 0;
    rc = pymoe_model_tokenize(model, prompt, (int32_t) strlen(prompt), true, false, prompt_tokens, 512, &n_prompt);
    if (rc == PYMOE_OK) {
        rc = pymoe_session_feed(session, prompt_tokens, n_prompt, false);
    }
    if (rc != PYMOE_OK) {
        pymoe_session_free(session);
        pymoe_model_free(model);
        return fail("prompt", rc);
    }

    struct pymoe_sampling_params greedy;
    pymoe_sampling_params_default(&greedy);
    greedy.temperature = 0.0f;

    pymoe_token * ids = calloc((size_t) (n_tokens > 0 ? n_tokens : 1), sizeof(pymoe_token));
    int           n   = 0;
    double        t0  = now_s();
    while (n < n_tokens) {
        pymoe_token token;
        if ((rc = pymoe_session_sample(session, &greedy, NULL, &token)) != PYMOE_OK) break;
        if (pymoe_model_token_is_eog(model, token)) break;
        if ((rc = pymoe_session_feed(session, &token, 1, false)) != PYMOE_OK) break;
        ids[n++] = token;
        char    piece[256];
        int32_t len = 0;
        if (pymoe_model_token_piece(model, token, false, piece, sizeof(piece), &len) == PYMOE_OK) {
            fwrite(piece, 1, (size_t) len, stdout);
            fflush(stdout);
        }
    }
    double elapsed = now_s() - t0;
    printf("\n");
    if (rc != PYMOE_OK) {
        fail("generate", rc);
    }
    fprintf(stderr, "ids:");
    for (int i = 0; i < n; i++) {
        fprintf(stderr, " %d", ids[i]);
    }
    fprintf(stderr, "\n%d tokens in %.3f s: %.1f tokens/s\n", n, elapsed, n / elapsed);

    free(ids);
    pymoe_session_free(session);  /* sessions before their model */
    pymoe_model_free(model);
    return rc == PYMOE_OK ? 0 : 1;
}
