/* broken_round.c - a decode that fails halfway through a speculative round,
 * driven from C: the draft's decode of a round arms the target's abort
 * callback, so the same round's verify batch stops. pymoe.h promises that
 * the loop then refuses every call but reset with PYMOE_ESTATE, and that a
 * reset makes it work again: it then generates what a fresh loop generates.
 *
 *   broken_round TARGET.gguf DRAFT.gguf    (prints "ok" or what went wrong) */
#include <pymoe.h>

#include <stdio.h>
#include <string.h>

static bool armed;        /* the next draft decode makes the target's next decode stop */
static bool stop_target;

static bool target_abort(void * user_data) {
    (void) user_data;
    return stop_target;
}

static bool draft_abort(void * user_data) {
    (void) user_data;
    stop_target = stop_target || armed;
    return false;
}

static int32_t open_pair(const char * target_path, const char * draft_path, pymoe_model ** models,
                         pymoe_session ** sessions) {
    const char * paths[2] = { target_path, draft_path };
    for (int i = 0; i < 2; i++) {
        struct pymoe_model_params mp;
        pymoe_model_params_default(&mp);
        mp.path    = paths[i];
        int32_t rc = pymoe_model_load(&mp, &models[i]);
        if (rc != PYMOE_OK) {
            return rc;
        }
        struct pymoe_session_params sp;
        pymoe_session_params_default(&sp);
        sp.n_ctx     = 512;
        sp.n_threads = 2;
        sp.abort     = i == 0 ? target_abort : draft_abort;
        rc           = pymoe_session_create(models[i], &sp, &sessions[i]);
        if (rc != PYMOE_OK) {
            return rc;
        }
    }
    return PYMOE_OK;
}

static int fail(const char * what, int32_t rc) {
    printf("%s: %s (%s)\n", what, pymoe_strerror(rc), pymoe_last_error());
    return 1;
}

/* Each call refused as the header says: PYMOE_ESTATE, the loop named broken. */
static int expect_refused(const char * what, int32_t rc) {
    if (rc != PYMOE_ESTATE || !strstr(pymoe_last_error(), "reset the loop")) {
        printf("%s on a broken loop: expected PYMOE_ESTATE, got %s (%s)\n", what, pymoe_strerror(rc),
               pymoe_last_error());
        return 1;
    }
    return 0;
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TARGET.gguf DRAFT.gguf\n", argv[0]);
        return 2;
    }
    pymoe_model *   broken_models[2] = { NULL, NULL }, *fresh_models[2] = { NULL, NULL };
    pymoe_session * broken_s[2] = { NULL, NULL }, *fresh_s[2] = { NULL, NULL };
    pymoe_spec *    broken = NULL, *fresh = NULL;
    struct pymoe_sampling_params greedy;
    pymoe_sampling_params_default(&greedy);
    greedy.temperature = 0.0f;
    struct pymoe_spec_params params;
    pymoe_spec_params_default(&params);
    params.sampling  = &greedy;
    params.draft_max = 3;
    int32_t rc = open_pair(argv[1], argv[2], broken_models, broken_s);
    rc = rc == PYMOE_OK ? open_pair(argv[1], argv[2], fresh_models, fresh_s) : rc;
    rc = rc == PYMOE_OK ? pymoe_spec_create(broken_s[0], broken_s[1], &params, &broken) : rc;
    rc = rc == PYMOE_OK ? pymoe_spec_create(fresh_s[0], fresh_s[1], &params, &fresh) : rc;
    if (rc != PYMOE_OK) {
        return fail("setup", rc);
    }
    const char * text = "one two three four five one two three four five";
    pymoe_token  prompt[64], out[64];
    int32_t      n_prompt = 0, n = 0, stop = 0;
    rc = pymoe_model_tokenize(broken_models[0], text, (int32_t) strlen(text), true, false, prompt, 64, &n_prompt);
    rc = rc == PYMOE_OK ? pymoe_spec_feed(broken, prompt, n_prompt) : rc;
    rc = rc == PYMOE_OK ? pymoe_spec_step(broken, 8, out, 64, &n, &stop) : rc;
    if (rc != PYMOE_OK) {
        return fail("the first round", rc);
    }
    armed = true;
    rc    = pymoe_spec_step(broken, 8, out, 64, &n, &stop);
    armed = stop_target = false;
    if (rc != PYMOE_EABORTED) {
        printf("the armed round: expected PYMOE_EABORTED, got %s (%s)\n", pymoe_strerror(rc), pymoe_last_error());
        return 1;
    }
    int bad = expect_refused("step", pymoe_spec_step(broken, 8, out, 64, &n, &stop));
    bad += expect_refused("feed", pymoe_spec_feed(broken, prompt, 1));
    bad += expect_refused("rewind", pymoe_spec_rewind(broken, 1));
    bad += expect_refused("run", pymoe_spec_run(broken, 8, NULL, NULL, &n, &stop));
    if (pymoe_spec_rewind_limit(broken) != 0) {
        printf("a broken loop says it can rewind %d tokens\n", pymoe_spec_rewind_limit(broken));
        bad += 1;
    }
    if (bad) {
        return 1;
    }
    /* the reset makes it work again: the same tokens as a loop that never broke */
    pymoe_token a[32], b[32];
    int32_t     n_a = 0, n_b = 0;
    rc = pymoe_spec_reset(broken);
    rc = rc == PYMOE_OK ? pymoe_spec_feed(broken, prompt, n_prompt) : rc;
    rc = rc == PYMOE_OK ? pymoe_spec_feed(fresh, prompt, n_prompt) : rc;
    while (rc == PYMOE_OK && n_a < 24) {
        rc = pymoe_spec_step(broken, 24 - n_a, a + n_a, 32 - n_a, &n, &stop);
        n_a += rc == PYMOE_OK ? n : 0;
        if (stop != PYMOE_STOP_NONE) {
            break;
        }
    }
    while (rc == PYMOE_OK && n_b < 24) {
        rc = pymoe_spec_step(fresh, 24 - n_b, b + n_b, 32 - n_b, &n, &stop);
        n_b += rc == PYMOE_OK ? n : 0;
        if (stop != PYMOE_STOP_NONE) {
            break;
        }
    }
    if (rc != PYMOE_OK) {
        return fail("after the reset", rc);
    }
    if (n_a != n_b || n_a == 0 || memcmp(a, b, sizeof(a[0]) * (size_t) n_a) != 0) {
        printf("after the reset the loop generated %d tokens unlike a fresh loop's %d\n", n_a, n_b);
        return 1;
    }
    pymoe_spec_free(broken);
    pymoe_spec_free(fresh);
    for (int i = 0; i < 2; i++) {
        pymoe_session_free(broken_s[i]);
        pymoe_session_free(fresh_s[i]);
        pymoe_model_free(broken_models[i]);
        pymoe_model_free(fresh_models[i]);
    }
    printf("ok %d tokens\n", n_a);
    return 0;
}
