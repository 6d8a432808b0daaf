/* gguf_reader_harness.c - the C reader (csrc/gguf_file.c and ggml's gguf.cpp)
 * under a coverage-guided fuzzer (cover.py), with ASan and UBSan.
 *
 * Reads file paths from stdin, one per line. For each: opens it with
 * pymoe_gguf_open, reads everything the reader offers, frees it, and writes
 * to stdout the status and the edges the call reached (AFL-style: each pair of
 * consecutive instrumented blocks, hashed into a 64 KiB map, with its hit
 * count bucketed). The reader's sources are built with
 * -fsanitize-coverage=trace-pc, which calls __sanitizer_cov_trace_pc at every
 * block; this file is not, so the hook below does not trace itself. */
#include "pymoe.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum { MAP_SIZE = 1 << 16 };

static uint8_t   edges[MAP_SIZE];
static uintptr_t previous;

void __sanitizer_cov_trace_pc(void) {
    uintptr_t here = (uintptr_t) __builtin_return_address(0);
    here           = ((here >> 4) ^ (here << 8)) & (MAP_SIZE - 1);
    edges[here ^ previous]++;
    previous = here >> 1;
}

/* the library's start-up and log hook (library.c) are not part of the reader under test: ggml's
 * parser logs to stderr here */
void         pymoe_init(void) {}
void         pymoe_llama_clear_error(void) {}
const char * pymoe_llama_last_error(void) { return ""; }

static uint8_t bucket(uint8_t n) {
    return n >= 128 ? 8 : n >= 32 ? 7 : n >= 16 ? 6 : n >= 8 ? 5 : n >= 4 ? 4 : n;
}

static int32_t read_everything(const char * path) {
    pymoe_gguf * g  = NULL;
    int32_t      rc = pymoe_gguf_open(path, &g);
    if (rc != PYMOE_OK) {
        return rc;
    }
    struct pymoe_gguf_info info;
    pymoe_gguf_get_info(g, &info);
    uint64_t total = 0;
    for (int32_t i = 0; i < info.n_tensors; i++) {
        const char * name;
        uint64_t     n_bytes;
        pymoe_gguf_tensor(g, i, &name, &n_bytes);
        total += n_bytes + strlen(name);  /* touches every name: a dangling one shows under ASan */
    }
    for (int32_t il = 0; il < info.n_layers; il++) {
        struct pymoe_gguf_layer layer;
        pymoe_gguf_layer(g, il, &layer);
        total += layer.kv_k_elements + layer.kv_v_elements + layer.recurrent_bytes;
    }
    pymoe_gguf_free(g);
    return total == UINT64_MAX ? -1 : rc;
}

int main(void) {
    static uint16_t hit[MAP_SIZE][2];
    char            path[4096];
    while (fgets(path, sizeof(path), stdin)) {
        path[strcspn(path, "\n")] = '\0';
        memset(edges, 0, sizeof(edges));
        previous         = 0;
        int32_t  rc      = read_everything(path);
        uint32_t n       = 0;
        for (uint32_t i = 0; i < MAP_SIZE; i++) {
            if (edges[i]) {
                hit[n][0]   = (uint16_t) i;
                hit[n++][1] = bucket(edges[i]);
            }
        }
        fwrite(&rc, sizeof(rc), 1, stdout);
        fwrite(&n, sizeof(n), 1, stdout);
        fwrite(hit, sizeof(hit[0]), n, stdout);
        fflush(stdout);
    }
    return 0;
}
