/* sampling.c - turn a logits row into a distribution and draw from it.
 *
 * Order (fixed, shared with speculative verification): top-k, top-p and
 * min-p choose which tokens stay, judged on softmax(logits); the temperature
 * then shapes the distribution over the tokens that stayed. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#    include <omp.h>
#    include <pthread.h>
#    include <stdatomic.h>
#endif

PYMOE_PARAMS_END_AT(struct pymoe_sampling_params, logit_bias);

static const struct pymoe_sampling_params DEFAULTS = {
    .size = sizeof(struct pymoe_sampling_params), .temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
    .repeat_penalty = 1.0f, .repeat_last_n = 64
};

void pymoe_sampling_params_init(struct pymoe_sampling_params * params, size_t size) {
    pymoe_struct_init(params, &DEFAULTS, sizeof(DEFAULTS), size);
}

static int32_t check_values(const struct pymoe_sampling_params * p) {
    if (!(p->temperature >= 0.0f) || isinf(p->temperature)) {
        return pymoe_fail(PYMOE_EINVAL, "temperature must be finite and >= 0, got %g", p->temperature);
    }
    if (p->top_k < 0) {
        return pymoe_fail(PYMOE_EINVAL, "top_k must be >= 0 (0 = off), got %d", p->top_k);
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "top_p must be in (0, 1] (1 = off), got %g", p->top_p);
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        return pymoe_fail(PYMOE_EINVAL, "min_p must be in [0, 1] (0 = off), got %g", p->min_p);
    }
    if (!(p->repeat_penalty > 0.0f) || isinf(p->repeat_penalty)) {
        return pymoe_fail(PYMOE_EINVAL, "repeat_penalty must be finite and > 0 (1 = off), got %g", p->repeat_penalty);
    }
    if (p->repeat_last_n < -1) {
        return pymoe_fail(PYMOE_EINVAL, "repeat_last_n must be >= -1 (0 = off, -1 = all), got %d", p->repeat_last_n);
    }
    if (!isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty)) {
        return pymoe_fail(PYMOE_EINVAL, "presence_penalty and frequency_penalty must be finite, got %g and %g",
                          p->presence_penalty, p->frequency_penalty);
    }
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias)) {
        return pymoe_fail(PYMOE_EINVAL, "logit_bias: %d entries at %p", p->n_logit_bias, (const void *) p->logit_bias);
    }
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const float b = p->logit_bias[i].bias;
        if (b != b || b == INFINITY) {
            return pymoe_fail(PYMOE_EINVAL, "logit_bias for token %d must be a number below +inf, got %g",
                              p->logit_bias[i].token, b);
        }
    }
    return PYMOE_OK;
}

int32_t pymoe_sampling_params_check(const struct pymoe_sampling_params * params) {
    struct pymoe_sampling_params         local;
    const struct pymoe_sampling_params * use = NULL;
    int32_t                              rc  = pymoe_sampling_params_in(params, &local, &use);
    return rc == PYMOE_OK ? pymoe_ok() : rc;
}

int32_t pymoe_sampling_params_in(const struct pymoe_sampling_params * params, struct pymoe_sampling_params * local,
                                 const struct pymoe_sampling_params ** use) {
    if (!params) {
        return pymoe_fail(PYMOE_EINVAL, "sampling params are NULL");
    }
    *use = params;
    if (params->size != sizeof(*params)) {  /* a caller built against another header */
        *local     = DEFAULTS;
        int32_t rc = pymoe_struct_in(params, local, sizeof(*local),
                                     PYMOE_PARAMS_V1(struct pymoe_sampling_params, min_p), "pymoe_sampling_params");
        if (rc != PYMOE_OK) {
            return rc;
        }
        *use = local;
    }
    return check_values(*use);
}

enum { LANES = 4, ACCUMULATORS = 8, BLOCKS_MAX = 1024, TOP_BLOCK = 256 };

/* LANES floats as one value (GCC and Clang vector extensions), so that the
 * max below compiles to vector compares on every target without fast-math */
typedef float   lanes_f __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(LANES * sizeof(int32_t))));

/* x86-64 builds are portable (SSE2); where the CPU has AVX2 the loader picks
 * a copy compiled for it (twice as many lanes per instruction). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#    define PYMOE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#    define PYMOE_VECTOR_CLONES
#endif

/* STEP floats as one value: what an AVX2 register holds (two SSE registers in the portable copy). */
enum { STEP = 2 * LANES };
typedef float   step_f __attribute__((vector_size(STEP * sizeof(float))));
typedef int32_t step_i __attribute__((vector_size(STEP * sizeof(int32_t))));

/* m = the larger of m and v, lane by lane (a NaN in v never wins); a macro, so that no call passes a wide
 * vector (whose ABI differs with AVX) */
#define PYMOE_STEP_MAX(m, v)                                                                                        \
    do {                                                                                                            \
        const step_i m_more = (v) > (m);                                                                            \
        (m)                 = (step_f) (((step_i) (v) & m_more) | ((step_i) (m) & ~m_more));                        \
    } while (0)

/* Whether any lane of a step's compare is true. */
#define PYMOE_STEP_ANY(mask)                                                                                        \
    ({                                                                                                              \
        uint64_t a_words[sizeof(step_i) / sizeof(uint64_t)], a_or = 0;                                              \
        memcpy(a_words, &(mask), sizeof(a_words));                                                                  \
        for (size_t a_j = 0; a_j < sizeof(a_words) / sizeof(uint64_t); a_j++) {                                     \
            a_or |= a_words[a_j];                                                                                   \
        }                                                                                                           \
        a_or != 0;                                                                                                  \
    })

/* The largest value of each block of `size` values of x[0..n) (the last
 * may be shorter) into out, NaN never (-INFINITY when a block has nothing
 * else). Four named accumulators, so that the compiler keeps them in
 * registers and their compares overlap (an array of them went through the
 * stack on every value). Returns whether a NaN was seen (a model's broken
 * output: found in this pass, the one every row already gets). */
PYMOE_VECTOR_CLONES static bool block_maxima(const float * x, int32_t n, int32_t size, float * out) {
    _Static_assert(ACCUMULATORS * LANES == 4 * STEP, "a block is a whole number of rounds of four steps");
    step_i nan      = { 0 };
    bool   nan_tail = false;
    for (int32_t from = 0, b = 0; from < n; from += size, b++) {
        const int32_t end = n - from < size ? n : from + size;
        step_f        m0 = (step_f) { 0 } - INFINITY, m1 = m0, m2 = m0, m3 = m0;
        int32_t       i  = from;
        for (; i + 4 * STEP <= end; i += 4 * STEP) {
            step_f v0, v1, v2, v3;
            memcpy(&v0, x + i, sizeof(v0));
            memcpy(&v1, x + i + STEP, sizeof(v1));
            memcpy(&v2, x + i + 2 * STEP, sizeof(v2));
            memcpy(&v3, x + i + 3 * STEP, sizeof(v3));
            nan |= (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3);
            PYMOE_STEP_MAX(m0, v0);
            PYMOE_STEP_MAX(m1, v1);
            PYMOE_STEP_MAX(m2, v2);
            PYMOE_STEP_MAX(m3, v3);
        }
        PYMOE_STEP_MAX(m0, m1);
        PYMOE_STEP_MAX(m2, m3);
        PYMOE_STEP_MAX(m0, m2);
        float best = -INFINITY;
        for (int32_t j = 0; j < STEP; j++) {
            best = m0[j] > best ? m0[j] : best;
        }
        for (; i < end; i++) {
            best = x[i] > best ? x[i] : best;
            nan_tail |= x[i] != x[i];
        }
        out[b] = best;
    }
    for (int32_t j = 0; j < STEP; j++) {
        nan_tail |= nan[j] != 0;
    }
    return nan_tail;
}

/* block_maxima over a whole row, on the threads the model's decode just ran on where the row is wide: a
 * row is read from memory once per token (600 kB at 152k tokens), and between decodes ggml's OpenMP workers
 * wait, spinning, for the next graph; this pass is the loop's largest cost of its own. Each thread takes a
 * whole number of blocks, so the maxima are the same. */
enum { SPLIT_MIN = 1 << 16, SPLIT_MAX_THREADS = 4 };

#ifdef _OPENMP
/* A forked child inherits an OpenMP pool whose threads it does not have (ggml's decodes made it, or rows
 * here): a parallel region there never ends (GNU libgomp), so a child reads rows on its own thread. Watched
 * from the library's load, before any fork that could matter. */
static atomic_bool forked;
static void        mark_forked(void) { atomic_store(&forked, true); }
__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, mark_forked); }
#endif

/* How many threads a pass over a row of n values in n_blocks blocks takes. */
static int32_t row_threads(int32_t n, int32_t n_blocks) {
#ifdef _OPENMP
    int32_t threads = omp_get_max_threads();
    threads = threads < SPLIT_MAX_THREADS ? threads : SPLIT_MAX_THREADS;
    threads = threads < n_blocks ? threads : n_blocks;
    if (n >= SPLIT_MIN && threads > 1 && !atomic_load(&forked) && !omp_in_parallel()) {
        return threads;
    }
#endif
    (void) n;
    (void) n_blocks;
    return 1;
}

static bool row_maxima(const float * x, int32_t n, int32_t size, float * out) {
    const int32_t n_blocks = (n + size - 1) / size, threads = row_threads(n, n_blocks);
    if (threads == 1) {
        return block_maxima(x, n, size, out);
    }
    bool nan = false;
#pragma omp parallel for num_threads(threads) reduction(|| : nan) schedule(static, 1)
    for (int32_t t = 0; t < threads; t++) {
        const int32_t b0 = n_blocks * t / threads, b1 = n_blocks * (t + 1) / threads;
        const int32_t from = b0 * size, end = b1 * size < n ? b1 * size : n;
        nan = block_maxima(x + from, end - from, size, out + b0) || nan;
    }
    return nan;
}

int32_t pymoe_row_fail(int32_t why, const char * whose) {
    if (why == PYMOE_ROW_NOT_NUMBERS) {
        return pymoe_fail(PYMOE_ENUMERIC, "%s are not all numbers (NaN or infinite): the model's weights are likely "
                          "corrupt, or its values overflow in their type", whose);
    }
    return pymoe_fail(PYMOE_EINVAL, "%s are all -inf: no token is left to choose", whose);
}

/* Blocks of at least `least` values, a whole number of accumulator rounds,
 * at most BLOCKS_MAX of them. */
static int32_t block_size(int32_t n, int32_t least) {
    int32_t size = (n + BLOCKS_MAX - 1) / BLOCKS_MAX;
    size         = size < least ? least : size;
    return (size + ACCUMULATORS * LANES - 1) / (ACCUMULATORS * LANES) * (ACCUMULATORS * LANES);
}

/* The block maxima, then a scan of the first block that holds the maximum
 * for its first occurrence: ties go to the lowest id. A row with a NaN or
 * +inf, or with nothing above -inf, has no argmax (PYMOE_ROW_*). */
pymoe_token pymoe_argmax(const float * logits, int32_t n) {
    const int32_t size = block_size(n, 2048);
    float         bmax[BLOCKS_MAX];
    const bool    nan  = row_maxima(logits, n, size, bmax);
    float   best = -INFINITY;
    int32_t from = 0;
    for (int32_t b = 0; b * size < n; b++) {
        if (bmax[b] > best) {
            best = bmax[b];
            from = b * size;
        }
    }
    if (nan || best == INFINITY) {
        return PYMOE_ROW_NOT_NUMBERS;
    }
    for (int32_t i = from; best > -INFINITY && i < n; i++) {
        if (logits[i] == best) {
            return i;
        }
    }
    return PYMOE_ROW_EMPTY;
}

int pymoe_by_id(const void * a, const void * b) {
    const pymoe_token x = ((const pymoe_candidate *) a)->id, y = ((const pymoe_candidate *) b)->id;
    return (x > y) - (x < y);
}

/* Larger logit first; equal logits by lower id, so the order is total. */
static int by_logit_desc(const void * a, const void * b) {
    const pymoe_candidate * x = a;
    const pymoe_candidate * y = b;
    if (x->logit != y->logit) {
        return x->logit > y->logit ? -1 : 1;
    }
    return (x->id > y->id) - (x->id < y->id);
}

/* Sift-down for a min-heap on (logit, then higher id is smaller). */
static bool heap_less(const pymoe_candidate * a, const pymoe_candidate * b) {
    return by_logit_desc(a, b) > 0;
}

static void sift_down(pymoe_candidate * h, int32_t n, int32_t i) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_less(&h[l], &h[m])) m = l;
        if (r < n && heap_less(&h[r], &h[m])) m = r;
        if (m == i) return;
        pymoe_candidate t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Fill c with the k largest logits (0 < k < n), sorted, largest first: a
 * heap over the whole row. */
static void top_candidates_heap(const float * logits, int32_t n, int32_t k, pymoe_candidate * c) {
    for (int32_t i = 0; i < k; i++) {
        c[i] = (pymoe_candidate) { i, logits[i], 0.0f };
    }
    for (int32_t i = k / 2 - 1; i >= 0; i--) {
        sift_down(c, k, i);
    }
    for (int32_t i = k; i < n; i++) {
        pymoe_candidate x = { i, logits[i], 0.0f };
        if (heap_less(&c[0], &x)) {
            c[0] = x;
            sift_down(c, k, 0);
        }
    }
    qsort(c, (size_t) k, sizeof(*c), by_logit_desc);
}

/* The k-th largest of v[0..n) (0 < k <= n, no NaN): a min-heap of the k largest so far. */
static float kth_largest(const float * v, int32_t n, int32_t k, float * heap) {
    for (int32_t i = 0; i < n; i++) {
        if (i >= k && !(v[i] > heap[0])) {
            continue;
        }
        int32_t j = i < k ? i : 0;  /* fill, then replace the root */
        if (i < k) {
            heap[j] = v[i];  /* sift up */
            while (j > 0 && heap[(j - 1) / 2] > heap[j]) {
                float t = heap[j];
                heap[j] = heap[(j - 1) / 2];
                heap[(j - 1) / 2] = t;
                j = (j - 1) / 2;
            }
            continue;
        }
        heap[0] = v[i];
        for (;;) {  /* sift down */
            int32_t l = 2 * j + 1, r = l + 1, m = j;
            if (l < k && heap[l] < heap[m]) m = l;
            if (r < k && heap[r] < heap[m]) m = r;
            if (m == j) break;
            float t = heap[j];
            heap[j] = heap[m];
            heap[m] = t;
            j = m;
        }
    }
    return heap[0];
}

/* Append to c[m..) every x[i] of x[from..end) in [lo, hi), in order; returns the new m, or -1 where more
 * than cap would be. A band is narrow: a step of STEP values with none in it is passed over by two compares. */
PYMOE_VECTOR_CLONES static int32_t collect_band(const float * x, int32_t from, int32_t end, float lo, float hi,
                                                pymoe_candidate * c, int32_t m, int32_t cap) {
    int32_t i = from;
    for (; i + STEP <= end; i += STEP) {
        step_f v;
        memcpy(&v, x + i, sizeof(v));
        const step_i in = (v >= lo) & (v < hi);
        if (!PYMOE_STEP_ANY(in)) {
            continue;
        }
        for (int32_t j = 0; j < STEP; j++) {
            if (x[i + j] >= lo && x[i + j] < hi) {
                if (m == cap) {
                    return -1;
                }
                c[m++] = (pymoe_candidate) { i + j, x[i + j], 0.0f };
            }
        }
    }
    for (; i < end; i++) {
        if (x[i] >= lo && x[i] < hi) {
            if (m == cap) {
                return -1;
            }
            c[m++] = (pymoe_candidate) { i, x[i], 0.0f };
        }
    }
    return m;
}

/* The same k tokens, in the same order, for a wide row: the k-th largest
 * block maximum t is a value that at least k logits reach (each of those k
 * blocks holds one), so every one of the k largest is >= t. One vector pass
 * finds the block maxima; only blocks reaching t are read again, for the
 * logits >= t (a few per block), which are then sorted. */
static int32_t top_candidates(const float * logits, int32_t n, int32_t k, pymoe_candidate * c) {
    const int32_t size     = block_size(n, TOP_BLOCK);
    const int32_t n_blocks = (n + size - 1) / size;
    float         bmax[BLOCKS_MAX], heap[BLOCKS_MAX] = { 0 };
    const bool    nan = row_maxima(logits, n, size, bmax);
    float         max = -INFINITY;
    for (int32_t b = 0; b < n_blocks; b++) {
        max = bmax[b] > max ? bmax[b] : max;
    }
    if (nan || max == INFINITY || max == -INFINITY) {
        return nan || max == INFINITY ? PYMOE_ROW_NOT_NUMBERS : PYMOE_ROW_EMPTY;
    }
    if (k > n_blocks / 4) {
        top_candidates_heap(logits, n, k, c);
        return PYMOE_OK;
    }
    const float t = kth_largest(bmax, n_blocks, k, heap);
    int32_t     m = 0;
    for (int32_t b = 0; b < n_blocks; b++) {
        if (!(bmax[b] >= t)) {
            continue;
        }
        const int32_t end = (b + 1) * size < n ? (b + 1) * size : n;
        m = collect_band(logits, b * size, end, t, INFINITY, c, m, n);
    }
    if (m < k || t == -INFINITY) {  /* rows with -inf among the k largest: the heap's order for those */
        top_candidates_heap(logits, n, k, c);
        return PYMOE_OK;
    }
    qsort(c, (size_t) m, sizeof(*c), by_logit_desc);
    return PYMOE_OK;
}

int32_t pymoe_top_candidates(const float * logits, int32_t n, int32_t k, pymoe_candidate * c) {
    return top_candidates(logits, n, k, c);
}

/* The softmax weights at temperature 1 (the most likely token weighs 1): what
 * top-p and min-p judge. Returns their sum. */
static double weigh(pymoe_candidate * c, int32_t n, float max) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf(c[i].logit - max);
        sum += c[i].p;
    }
    return sum;
}

/* top-p, then min-p, on candidates sorted most likely first: how many stay.
 * sum: the weight of every candidate top-k kept, sorted here or not. */
static int32_t cut_sorted(const pymoe_candidate * c, int32_t n, double sum, const struct pymoe_sampling_params * p) {
    /* top-p: the shortest prefix whose mass reaches top_p */
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int32_t i = 0; i < n; i++) {
            cum += c[i].p / sum;
            if (cum >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    /* min-p: relative to the most likely token, whose weight is 1 */
    if (p->min_p > 0.0f) {
        int32_t keep = 1;
        while (keep < n && c[keep].p >= p->min_p) {
            keep++;
        }
        n = keep;
    }
    return n;
}

/* exp(x) for x <= 0 on lanes: 2^j * 2^f with j = round(x log2 e) and 2^f,
 * |f| <= 1/2, by its Taylor series to degree 7 (relative error ~5e-9);
 * 0 below -87 (under 2^-125) and for NaN. One body for LANES and for twice
 * as many (what an AVX2 register holds: the log-sum-exp of a whole row); a
 * statement expression, not a function: no call passes a wide vector, whose
 * ABI differs with AVX. */
#define PYMOE_EXP_NONPOSITIVE(vf, vi, value)                                                                        \
    ({                                                                                                              \
        vf       e_x     = (value);                                                                                 \
        const vi e_keep  = e_x > (vf) { 0 } - 87.0f; /* false for NaN */                                            \
        const vf e_magic = (vf) { 0 } + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */               \
        e_x              = (vf) ((vi) e_x & e_keep);                                                                \
        const vf e_t     = e_x * 1.44269504f;                                                                       \
        const vf e_big   = e_t + e_magic;                                                                           \
        const vf e_f     = e_t - (e_big - e_magic);                                                                 \
        const vf e_g     = e_f * 0.693147181f;                                                                      \
        vf       e_y     = e_g * (1.0f / 5040) + 1.0f / 720;                                                        \
        e_y              = e_y * e_g + 1.0f / 120;                                                                  \
        e_y              = e_y * e_g + 1.0f / 24;                                                                   \
        e_y              = e_y * e_g + 1.0f / 6;                                                                    \
        e_y              = e_y * e_g + 0.5f;                                                                        \
        e_y              = e_y * e_g + 1.0f;                                                                        \
        e_y              = e_y * e_g + 1.0f;                                                                        \
        const vi e_j     = ((vi) e_big - (vi) e_magic) << 23; /* round(t), as exponent bits */                      \
        (vf) (((vi) e_y + e_j) & e_keep);                                                                           \
    })

static inline lanes_f exp_nonpositive(lanes_f x) {
    return PYMOE_EXP_NONPOSITIVE(lanes_f, lanes_i, x);
}

/* w[i] = exp(logits[i] - max), the softmax weights at temperature 1. */
PYMOE_VECTOR_CLONES static void weigh_all(const float * logits, int32_t n, float max, float * w) {
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        lanes_f x;
        memcpy(&x, logits + i, sizeof(x));
        x = exp_nonpositive(x - max);
        memcpy(w + i, &x, sizeof(x));
    }
    for (; i < n; i++) {
        lanes_f x = (lanes_f) { 0 } + (logits[i] - max);
        w[i]      = exp_nonpositive(x)[0];
    }
}

/* The sum of exp(x[i] - max) of each block of `size` values of x[0..n) into out, every term added in
 * double: where one lane holds the top token's weight 1, float lanes would drop what is added to it below
 * 2^-25, and a top-p near 1 decides on that much. */
typedef double lanes_d __attribute__((vector_size(LANES * sizeof(double))));

PYMOE_VECTOR_CLONES static void block_weight_sums(const float * x, int32_t n, int32_t size, float max, double * out) {
    for (int32_t from = 0, b = 0; from < n; from += size, b++) {
        const int32_t end = n - from < size ? n : from + size;
        lanes_d       low = { 0 }, high = { 0 };  /* two named halves: registers, not the stack */
        int32_t       i   = from;
        for (; i + STEP <= end; i += STEP) {
            step_f v;
            memcpy(&v, x + i, sizeof(v));
            v = PYMOE_EXP_NONPOSITIVE(step_f, step_i, v - max);
            lanes_f half[2];
            memcpy(half, &v, sizeof(half));
            low += __builtin_convertvector(half[0], lanes_d);
            high += __builtin_convertvector(half[1], lanes_d);
        }
        double sum = 0.0;
        for (int32_t j = 0; j < LANES; j++) {
            sum += low[j] + high[j];
        }
        for (; i < end; i++) {
            lanes_f v = (lanes_f) { 0 } + (x[i] - max);
            sum += exp_nonpositive(v)[0];
        }
        out[b] = sum;
    }
}

/* The sum of exp(logits[i] - max) (at least 1: the maximum's own term), on the decode's threads like
 * row_maxima: block by block, then the blocks' sums in order, so that it is the same on any thread count. */
static double sum_weights(const float * logits, int32_t n, float max) {
    const int32_t size = block_size(n, 2048), n_blocks = (n + size - 1) / size, threads = row_threads(n, n_blocks);
    double        sums[BLOCKS_MAX];
    if (threads == 1) {
        block_weight_sums(logits, n, size, max, sums);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int32_t t = 0; t < threads; t++) {
            const int32_t b0 = n_blocks * t / threads, b1 = n_blocks * (t + 1) / threads;
            const int32_t from = b0 * size, end = b1 * size < n ? b1 * size : n;
            block_weight_sums(logits + from, end - from, size, max, sums + b0);
        }
    }
    double sum = 0.0;
    for (int32_t b = 0; b < n_blocks; b++) {
        sum += sums[b];
    }
    return sum;
}

int32_t pymoe_log_sum_exp(const float * logits, int32_t n, double * out) {
    const int32_t size = block_size(n, 2048);
    float         bmax[BLOCKS_MAX];
    const bool    nan = row_maxima(logits, n, size, bmax);
    float         max = -INFINITY;
    for (int32_t b = 0; b * size < n; b++) {
        max = bmax[b] > max ? bmax[b] : max;
    }
    if (nan || max == INFINITY || max == -INFINITY) {
        return nan || max == INFINITY ? PYMOE_ROW_NOT_NUMBERS : PYMOE_ROW_EMPTY;
    }
    *out = (double) max + log(sum_weights(logits, n, max));
    return PYMOE_OK;
}

/* A weight in [0, 1] by its top bits: keys ascend with the weight, eight to an octave. */
enum { KEY_SHIFT = 20, KEYS = (0x3F800000 >> KEY_SHIFT) + 1 };

static int32_t weight_key(float w) {
    uint32_t bits;
    memcpy(&bits, &w, sizeof(bits));
    bits >>= KEY_SHIFT;
    return bits < KEYS ? (int32_t) bits : KEYS - 1;
}

/* The smallest weight with w's key. */
static float key_floor(float w) {
    const uint32_t bits = (uint32_t) weight_key(w) << KEY_SHIFT;
    float          f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* Top-p and min-p without top-k over a wide row where it is peaked (a
 * model's usual row): the tokens within a factor `floor` of the most likely
 * are a prefix of the row sorted, so where their mass reaches top_p the cut
 * lies among them, and they are all min-p can keep when floor is min_p. One
 * vector pass sums the weights, one more per floor collects (a factor 2^10
 * lower each time, a new band of logits); the few collected are sorted. A
 * flat row (more than SORT_MAX collected) is left to the weight keys below:
 * returns -1 then. */
enum { SORT_MAX = 4096 };

static int32_t cut_peaked(const float * logits, int32_t n, pymoe_token top, const struct pymoe_sampling_params * p,
                          pymoe_candidate * c) {
    const float  max  = logits[top];
    const double sum  = sum_weights(logits, n, max);
    const double goal = p->top_p < 1.0f ? p->top_p * sum : INFINITY;
    /* the logit bounds of each band, a little wide: a weight decides below, not its logit; min-p's band
     * reaches down to the bottom of min_p's key, whose tokens the binned cut weighs in top-p's sum */
    float   floor = p->min_p > 0.0f ? key_floor(p->min_p) : 0x1p-10f, above = INFINITY;
    int32_t m     = 0;
    double  mass  = 0.0;
    for (;;) {
        const float from = max + logf(floor) - 1e-3f;
        m = collect_band(logits, 0, n, from, above, c, m, SORT_MAX);
        if (m < 0) {
            return -1;
        }
        for (int32_t i = 0; i < m; i++) {  /* the new band's weights (the old keep theirs) */
            if (c[i].logit < above) {
                lanes_f x = (lanes_f) { 0 } + (c[i].logit - max);
                c[i].p    = exp_nonpositive(x)[0];
                mass += c[i].p;
            }
        }
        if (mass >= goal || p->min_p > 0.0f || floor < 0x1p-120f) {
            break;
        }
        above = from;
        floor *= 0x1p-10f;
    }
    qsort(c, (size_t) m, sizeof(*c), by_logit_desc);
    int32_t kept = m;
    if (mass >= goal) {  /* top-p: the shortest prefix whose mass reaches it */
        double cum = 0.0;
        for (int32_t i = 0; i < m; i++) {
            cum += c[i].p;
            if (cum >= goal) {
                kept = i + 1;
                break;
            }
        }
    }
    const int32_t boundary = mass >= goal ? weight_key(c[kept - 1].p) : -1;  /* the key top-p's cut lies in */
    int32_t       out      = 1;  /* min-p, token by token (the vector exp is not monotone to the last bit) */
    for (int32_t i = 1; i < kept; i++) {
        if (c[i].p >= p->min_p) {
            c[out++] = c[i];
        }
    }
    /* the order the binned cut gives its candidates, so that a seed draws what it drew: those above the
     * boundary's key by id, those in it by logit, and the most likely token first */
    int32_t n_above = 0;
    while (n_above < out && weight_key(c[n_above].p) > boundary) {
        n_above++;
    }
    qsort(c, (size_t) n_above, sizeof(*c), pymoe_by_id);
    for (int32_t i = 0; i < n_above; i++) {
        if (c[i].id == top) {
            const pymoe_candidate first = c[i];
            c[i]                        = c[0];
            c[0]                        = first;
            break;
        }
    }
    return out;
}

/* Without top-k, sorting the whole vocabulary was the cost (25 ms a row at
 * 152k tokens). Top-p keeps the most likely tokens until their mass reaches
 * top_p, so the weights' mass per key, summed from the top, says in which
 * key the cut lies: every token above it is kept, unsorted, and only the
 * tokens of that one key are sorted to place the cut. Min-p is a threshold.
 * The most likely token comes first. */
static int32_t cut_without_top_k(const float * logits, int32_t n, const struct pymoe_sampling_params * p,
                                 pymoe_candidate * c) {
    const pymoe_token top = pymoe_argmax(logits, n);
    if (top < 0) {
        return top;
    }
    if (p->top_p >= 1.0f && p->min_p <= 0.0f) {  /* every token stays: the most likely first, the rest unsorted */
        for (int32_t i = 0; i < n; i++) {  /* (their weights: the temperature's, in the caller) */
            c[i] = (pymoe_candidate) { i, logits[i], 0.0f };
        }
        pymoe_candidate first = c[top];
        c[top]                = c[0];
        c[0]                  = first;
        return n;
    }
    const int32_t peaked = cut_peaked(logits, n, top, p, c);
    if (peaked > 0) {
        return peaked;
    }
    float * w = (float *) (c + n);  /* the scratch's weights */
    weigh_all(logits, n, logits[top], w);
    w[top] = 1.0f;
    double mass[KEYS] = { 0.0 };
    for (int32_t i = 0; i < n; i++) {
        mass[weight_key(w[i])] += w[i];
    }
    double sum = 0.0;
    for (int32_t k = 0; k < KEYS; k++) {
        sum += mass[k];
    }
    /* the key top-p's cut lies in (boundary), and the mass above it */
    int32_t boundary = 0;
    double  above    = 0.0;
    if (p->top_p < 1.0f) {
        boundary = KEYS - 1;
        while (boundary > 0 && above + mass[boundary] < p->top_p * sum) {
            above += mass[boundary--];
        }
    }
    const int32_t lowest = p->min_p > 0.0f && weight_key(p->min_p) > boundary ? weight_key(p->min_p) : boundary;
    int32_t       m = 0, n_above = 0;
    for (int32_t i = 0; i < n; i++) {
        const int32_t key = weight_key(w[i]);
        if (key >= lowest) {
            c[m++] = (pymoe_candidate) { i, logits[i], w[i] };
            if (key > boundary) {  /* kept by top-p: to the front */
                pymoe_candidate x = c[m - 1];
                c[m - 1]          = c[n_above];
                c[n_above++]      = x;
            }
        }
    }
    int32_t kept = m;
    if (p->top_p < 1.0f && n_above < m) {  /* the boundary key's tokens in order, until the mass reaches top_p */
        qsort(c + n_above, (size_t) (m - n_above), sizeof(*c), by_logit_desc);
        double cum = above;
        for (int32_t i = n_above; i < m; i++) {
            cum += c[i].p;
            if (cum >= p->top_p * sum) {
                kept = i + 1;
                break;
            }
        }
    }
    int32_t out = 0;
    for (int32_t i = 0; i < kept; i++) {  /* min-p; the most likely token to the front */
        if (c[i].p >= p->min_p || c[i].id == top) {
            c[out] = c[i];
            if (c[out].id == top && out > 0) {
                pymoe_candidate x = c[out];
                c[out]            = c[0];
                c[0]              = x;
            }
            out++;
        }
    }
    return out;
}

bool pymoe_sampling_keeps_all(const struct pymoe_sampling_params * p, int32_t n_vocab) {
    return p->temperature > 0.0f && (p->top_k <= 0 || p->top_k >= n_vocab) && p->top_p >= 1.0f && p->min_p <= 0.0f;
}

/* w[i] = exp((x[i] - max) / temperature) for the whole row; returns their sum (in double by runs of lanes). */
PYMOE_VECTOR_CLONES static double temper_all(const float * x, int32_t n, float max, float temperature, float * w) {
    const int32_t whole = n - n % STEP;
    double        sum   = 0.0;
    int32_t       i     = 0;
    while (i < whole) {
        step_f acc = { 0 };
        for (const int32_t run = whole - i < 64 * STEP ? whole : i + 64 * STEP; i < run; i += STEP) {
            step_f v;
            memcpy(&v, x + i, sizeof(v));
            v = PYMOE_EXP_NONPOSITIVE(step_f, step_i, (v - max) / temperature);
            memcpy(w + i, &v, sizeof(v));
            acc += v;
        }
        for (int32_t j = 0; j < STEP; j++) {
            sum += acc[j];
        }
    }
    for (; i < n; i++) {
        w[i] = exp_nonpositive((lanes_f) { 0 } + (x[i] - max) / temperature)[0];
        sum += w[i];
    }
    return sum;
}

PYMOE_VECTOR_CLONES static void scale_all(float * w, int32_t n, float by) {
    for (int32_t i = 0; i < n; i++) {
        w[i] *= by;
    }
}

pymoe_token pymoe_sampling_dense(const float * logits, int32_t n_vocab, float temperature, float * probs) {
    const pymoe_token top = pymoe_argmax(logits, n_vocab);
    if (top >= 0) {
        scale_all(probs, n_vocab, (float) (1.0 / temper_all(logits, n_vocab, logits[top], temperature, probs)));
    }
    return top;
}

int32_t pymoe_sampling_transform(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * p,
                                 pymoe_candidate * c) {
    int32_t n;
    if (p->top_k > 0 && p->top_k < n_vocab) {
        n = top_candidates(logits, n_vocab, p->top_k, c);
        if (n < 0) {
            return n;
        }
        n = cut_sorted(c, p->top_k, weigh(c, p->top_k, c[0].logit), p);
    } else {
        n = cut_without_top_k(logits, n_vocab, p, c);
        if (n < 0) {
            return n;
        }
    }
    /* temperature on the survivors */
    const float max = c[0].logit;
    double      sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf((c[i].logit - max) / p->temperature);
        sum += c[i].p;
    }
    for (int32_t i = 0; i < n; i++) {
        c[i].p = (float) (c[i].p / sum);
    }
    return n;
}

/* A draw among the kept candidates (their p, read with the stride of the struct). */
static pymoe_token pick_candidate(const pymoe_candidate * c, int32_t n, double u) {
    _Static_assert(sizeof(pymoe_candidate) % sizeof(float) == 0, "candidates are a whole number of floats");
    int32_t i = pymoe_draw(&c[0].p, NULL, n, sizeof(pymoe_candidate) / sizeof(float), u);
    return c[i >= 0 ? i : 0].id;
}

int32_t pymoe_sample_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                          uint64_t * rng_state, pymoe_candidate * scratch, const char * whose, pymoe_token * out) {
    if (!logits || n_vocab <= 0 || !out) {
        return pymoe_fail(PYMOE_EINVAL, "sample: logits, n_vocab > 0 and out are required");
    }
    struct pymoe_sampling_params local;
    int32_t                      rc = pymoe_sampling_params_in(params, &local, &params);
    if (rc != PYMOE_OK) {
        return rc;
    }
    if (params->temperature == 0.0f) {
        const pymoe_token top = pymoe_argmax(logits, n_vocab);
        if (top < 0) {
            return pymoe_row_fail(top, whose);
        }
        *out = top;
        return pymoe_ok();
    }
    if (!rng_state) {
        return pymoe_fail(PYMOE_EINVAL, "sampling at temperature %g needs a random state", params->temperature);
    }
    if (pymoe_sampling_keeps_all(params, n_vocab)) {
        /* every token: a draw over the row's probabilities, walked as the candidates always were (the most
         * likely first, in token 0's place), so that a seed draws what it drew */
        float *           probs = (float *) scratch;
        const pymoe_token top   = pymoe_sampling_dense(logits, n_vocab, params->temperature, probs);
        if (top < 0) {
            return pymoe_row_fail(top, whose);
        }
        const float first = probs[top];
        probs[top]        = probs[0];
        probs[0]          = first;
        const int32_t at  = pymoe_draw(probs, NULL, n_vocab, 1, pymoe_rng_uniform(rng_state));
        *out              = at == 0 || at < 0 ? top : at == top ? 0 : at;
        return pymoe_ok();
    }
    int32_t n = pymoe_sampling_transform(logits, n_vocab, params, scratch);
    if (n < 0) {
        return pymoe_row_fail(n, whose);
    }
    *out = pick_candidate(scratch, n, pymoe_rng_uniform(rng_state));
    return pymoe_ok();
}

int32_t pymoe_sample(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                     uint64_t * rng_state, pymoe_token * out) {
    if (params && params->size == sizeof(*params) && params->temperature == 0.0f) {
        return pymoe_sample_with(logits, n_vocab, params, rng_state, NULL, "the logits", out);
    }
    if (n_vocab <= 0) {
        return pymoe_fail(PYMOE_EINVAL, "sample: n_vocab must be > 0");
    }
    pymoe_candidate * scratch = malloc(PYMOE_SAMPLING_SCRATCH(n_vocab));
    if (!scratch) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    int32_t rc = pymoe_sample_with(logits, n_vocab, params, rng_state, scratch, "the logits", out);
    free(scratch);
    return rc;
}

int32_t pymoe_probs_with(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                         pymoe_candidate * scratch, float * probs) {
    memset(probs, 0, sizeof(*probs) * (size_t) n_vocab);
    if (params->temperature == 0.0f) {
        const pymoe_token top = pymoe_argmax(logits, n_vocab);
        if (top >= 0) {
            probs[top] = 1.0f;
        }
        return top < 0 ? top : 1;
    }
    if (pymoe_sampling_keeps_all(params, n_vocab)) {
        const pymoe_token top = pymoe_sampling_dense(logits, n_vocab, params->temperature, probs);
        return top >= 0 ? n_vocab : top;
    }
    int32_t n = pymoe_sampling_transform(logits, n_vocab, params, scratch);
    for (int32_t i = 0; i < n; i++) {
        probs[scratch[i].id] = scratch[i].p;
    }
    return n;
}

int32_t pymoe_sampling_probs(const float * logits, int32_t n_vocab, const struct pymoe_sampling_params * params,
                             float * probs) {
    if (!logits || n_vocab <= 0 || !probs) {
        return pymoe_fail(PYMOE_EINVAL, "sampling_probs: logits, n_vocab > 0 and probs are required");
    }
    struct pymoe_sampling_params local;
    int32_t                      rc = pymoe_sampling_params_in(params, &local, &params);
    if (rc != PYMOE_OK) {
        return rc;
    }
    pymoe_candidate * c = malloc(PYMOE_SAMPLING_SCRATCH(n_vocab));
    if (!c) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory");
    }
    const int32_t n = pymoe_probs_with(logits, n_vocab, params, c, probs);
    free(c);
    return n < 0 ? pymoe_row_fail(n, "the logits") : pymoe_ok();
}

int32_t pymoe_sampling_pick(const float * probs, int32_t n_vocab, double u, pymoe_token * out) {
    if (!probs || n_vocab <= 0 || !out || !(u >= 0.0 && u < 1.0)) {
        return pymoe_fail(PYMOE_EINVAL, "sampling_pick: need probs, n_vocab > 0, out and u in [0, 1)");
    }
    for (int32_t i = 0; i < n_vocab; i++) {
        if (!(probs[i] >= 0.0f)) {
            return pymoe_fail(PYMOE_EINVAL, "probs[%d] = %g is not a probability", i, probs[i]);
        }
    }
    int32_t i = pymoe_draw(probs, NULL, n_vocab, 1, u);
    if (i < 0) {
        return pymoe_fail(PYMOE_EINVAL, "probs sum to 0: nothing to pick");
    }
    *out = i;
    return pymoe_ok();
}
