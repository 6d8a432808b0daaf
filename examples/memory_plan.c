/* memory_plan.c - the pre-check from C: where a model's weights would go and
 * whether the load can lock them, without loading anything; then, with
 * --load, the load and what it did.
 *
 *   cc examples/memory_plan.c -o memory_plan $(pymoe --cflags --libs)
 *   ./memory_plan model.gguf [n_cpu_moe] [host:port,...] [--load]
 */
#include <pymoe.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char * mode_name(int32_t mode) {
    static const char * const names[] = { "mmap", "no-mmap", "mlock", "auto" };
    return mode >= 0 && mode <= 3 ? names[mode] : "?";
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s model.gguf [n_cpu_moe] [host:port,...] [--load]\n", argv[0]);
        return 2;
    }
    struct pymoe_model_params params;
    pymoe_model_params_default(&params);
    params.path        = argv[1];
    params.n_cpu_moe   = argc > 2 ? atoi(argv[2]) : 0;
    params.rpc_servers = argc > 3 && strcmp(argv[3], "-") != 0 ? argv[3] : NULL;
    bool load          = argc > 4 && strcmp(argv[4], "--load") == 0;

    struct pymoe_memory_plan plan;
    if (pymoe_memory_plan_for(&params, &plan) != PYMOE_OK) {
        fprintf(stderr, "error: %s\n", pymoe_last_error());
        return 1;
    }
    for (int32_t d = 0; d < plan.placement.n_devices; d++) {
        printf("device %s: %llu bytes of weights (%llu of them experts)\n", plan.device_names[d],
               (unsigned long long) plan.placement.bytes[d], (unsigned long long) plan.placement.expert_bytes[d]);
    }
    printf("load mode: %s, lockable: %s, fits: %s\n", mode_name(plan.load_mode), plan.lockable ? "yes" : "no",
           plan.fits ? "yes" : "no");
    if (plan.problem[0]) {
        printf("problem: %s\n", plan.problem);
    }
    if (!load) {
        return 0;
    }
    pymoe_model * model = NULL;
    if (pymoe_model_load(&params, &model) != PYMOE_OK) {
        fprintf(stderr, "error: %s\n", pymoe_last_error());
        return 1;
    }
    struct pymoe_load_report report = { .size = sizeof(report) };
    pymoe_model_load_report(model, &report);
    for (int32_t d = 0; d < report.plan.placement.n_devices; d++) {
        printf("allocated on %s: %llu bytes\n", report.plan.device_names[d],
               (unsigned long long) report.device_bytes[d]);
    }
    printf("loaded with %s in %.3f s, %llu bytes locked\n", mode_name(report.load_mode), report.load_seconds,
           (unsigned long long) report.locked_bytes);
    pymoe_model_free(model);
    return 0;
}
