/* feed_sample_loop.c - the C side of bench/overhead.py: the loop it times in
 * Python, written in C.
 *
 * Built twice by the benchmark:
 *   - as a shared library: overhead.py calls feed_sample_loop() on its own
 *     session, so both loops run in the same process, on the same memory;
 *   - with -DCOUNT_INSTRUCTIONS added, as the library run under callgrind;
 *   - with -DSTANDALONE as a program that loads the model itself and runs the
 *     loop for every line "run" on its stdin (a second process, as a user's C
 *     tool would be). Usage: feed_sample_loop MODEL N_THREADS N_TOKENS PROMPT_TOKEN...
 */
#define _POSIX_C_SOURCE 199309L
#include <pymoe.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define EXPORT __attribute__((visibility("default")))

/* the loop itself: n_tokens rounds of feed(one token) + greedy sample; 0 or -1 */
EXPORT int feed_sample_rounds(pymoe_session * s, pymoe_token token, int n_tokens, pymoe_token * last) {
    struct pymoe_sampling_params greedy;
    pymoe_sampling_params_default(&greedy);
    greedy.temperature = 0.0f;
    for (int i = 0; i < n_tokens; i++) {
        if (pymoe_session_feed(s, &token, 1, false) != PYMOE_OK ||
            pymoe_session_sample(s, &greedy, NULL, &token) != PYMOE_OK) {
            return -1;
        }
    }
    *last = token;
    return 0;
}

/* reset, feed the prompt, then time the first sample and n_tokens rounds;
 * returns the seconds of the timed part, or -1 on error */
EXPORT double feed_sample_loop(pymoe_session * s, const pymoe_token * prompt, int n_prompt, int n_tokens,
                               pymoe_token * last) {
    struct pymoe_sampling_params greedy;
    pymoe_sampling_params_default(&greedy);
    greedy.temperature = 0.0f;
    if (pymoe_session_reset(s) != PYMOE_OK || pymoe_session_feed(s, prompt, n_prompt, false) != PYMOE_OK) {
        return -1.0;
    }
    double      t0 = now_s();
    pymoe_token token;
    if (pymoe_session_sample(s, &greedy, NULL, &token) != PYMOE_OK ||
        feed_sample_rounds(s, token, n_tokens, last) != 0) {
        return -1.0;
    }
    return now_s() - t0;
}

#ifdef COUNT_INSTRUCTIONS
#    include <valgrind/callgrind.h>

/* start or stop callgrind's counting (run with --collect-atstart=no) */
EXPORT void count_instructions_toggle(void) {
    CALLGRIND_TOGGLE_COLLECT;
}
#endif

#ifdef STANDALONE
int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL N_THREADS N_TOKENS PROMPT_TOKEN...\n", argv[0]);
        return 2;
    }
    int         n_prompt = argc - 4 < 256 ? argc - 4 : 256;
    pymoe_token prompt[256];
    for (int i = 0; i < n_prompt; i++) {
        prompt[i] = atoi(argv[4 + i]);
    }
    struct pymoe_model_params mp;
    pymoe_model_params_default(&mp);
    mp.path                         = argv[1];
    pymoe_model *               model = NULL;
    pymoe_session *             s     = NULL;
    struct pymoe_session_params sp;
    pymoe_session_params_default(&sp);
    sp.n_ctx     = 512;
    sp.n_threads = atoi(argv[2]);
    if (pymoe_model_load(&mp, &model) != PYMOE_OK || pymoe_session_create(model, &sp, &s) != PYMOE_OK) {
        fprintf(stderr, "%s\n", pymoe_last_error());
        return 1;
    }
    char line[64];
    while (fgets(line, sizeof(line), stdin) && strncmp(line, "run", 3) == 0) {
        pymoe_token last    = -1;
        double      seconds = feed_sample_loop(s, prompt, n_prompt, atoi(argv[3]), &last);
        if (seconds < 0) {
            fprintf(stderr, "%s\n", pymoe_last_error());
            return 1;
        }
        printf("%.9f %d\n", seconds, last);
        fflush(stdout);
    }
    pymoe_session_free(s);
    pymoe_model_free(model);
    return 0;
}
#endif
