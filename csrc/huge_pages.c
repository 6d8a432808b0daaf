/* huge_pages.c - huge pages for the weights a load reads into memory of its own.
 *
 * With no-mmap and mlock, llama.cpp reads the weights into buffers it
 * allocates, anonymous memory the kernel backs with 4 KiB pages unless told
 * otherwise (transparent huge pages in "madvise" mode, the usual default),
 * while a mapped file may be served from huge page-cache folios. Measured on
 * this project's VM (bench/results/load_mode_decode.md): mmap'd weights
 * decoded 2-5% faster than locked ones, and with huge pages the locked ones
 * ran 5-7% faster than mmap'd: every token reads all active weights, and 4 KiB
 * pages cost a TLB miss every 4 KiB. llama.cpp does not say where its buffers
 * are, so the anonymous regions that appear during a load are taken to be
 * them: advised for huge pages as soon as the load reports progress (before
 * no-mmap reads fill them), and collapsed into huge pages after the load when
 * they were filled before that (mlock populates a buffer when it locks it). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#    include <sys/mman.h>
#    ifndef MADV_HUGEPAGE
#        define MADV_HUGEPAGE 14
#    endif
#    ifndef MADV_COLLAPSE
#        define MADV_COLLAPSE 25
#    endif
#endif

enum { HUGE = 2 << 20 };  /* regions smaller than one huge page gain nothing */

struct pymoe_anon_regions {
    uintptr_t * lo;
    size_t      n, cap;
};

/* Visit every large private anonymous read-write region of this process. */
static void each_region(void (*fn)(uintptr_t lo, uintptr_t hi, void * data), void * data) {
#if defined(__linux__)
    FILE * f = fopen("/proc/self/maps", "r");
    if (!f) {
        return;
    }
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        unsigned long lo, hi, inode;
        char          perms[8], path[8] = "";
        if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %7s", &lo, &hi, perms, &inode, path) < 4) {
            continue;
        }
        if (inode == 0 && path[0] == '\0' && strncmp(perms, "rw-p", 4) == 0 && hi - lo >= HUGE) {
            fn((uintptr_t) lo, (uintptr_t) hi, data);
        }
    }
    fclose(f);
#else
    (void) fn;
    (void) data;
#endif
}

static void remember(uintptr_t lo, uintptr_t hi, void * data) {
    struct pymoe_anon_regions * r = data;
    (void) hi;
    if (r->n == r->cap) {
        size_t      cap = r->cap ? 2 * r->cap : 64;
        uintptr_t * grown = realloc(r->lo, cap * sizeof(*grown));
        if (!grown) {
            return;  /* an unknown region is advised too: harmless */
        }
        r->lo  = grown;
        r->cap = cap;
    }
    r->lo[r->n++] = lo;
}

struct pymoe_anon_regions * pymoe_anon_regions_now(void) {
    struct pymoe_anon_regions * r = calloc(1, sizeof(*r));
    if (r) {
        each_region(remember, r);
    }
    return r;
}

void pymoe_anon_regions_free(struct pymoe_anon_regions * r) {
    if (r) {
        free(r->lo);
        free(r);
    }
}

struct advice {
    const struct pymoe_anon_regions * before;
    int                               how;
    uint64_t                          bytes;
};

static void advise_new(uintptr_t lo, uintptr_t hi, void * data) {
    struct advice * a = data;
    for (size_t i = 0; a->before && i < a->before->n; i++) {
        if (a->before->lo[i] == lo) {
            return;  /* there before the load: not this model's */
        }
    }
#if defined(__linux__)
    if (madvise((void *) lo, hi - lo, a->how) == 0) {
        a->bytes += hi - lo;
    }
#endif
}

uint64_t pymoe_huge_pages_advise(const struct pymoe_anon_regions * before, bool collapse) {
#if defined(__linux__)
    struct advice a = { before, collapse ? MADV_COLLAPSE : MADV_HUGEPAGE, 0 };
    each_region(advise_new, &a);
    return a.bytes;
#else
    (void) before;
    (void) collapse;
    return 0;
#endif
}
