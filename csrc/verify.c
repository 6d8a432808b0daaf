/* verify.c - the speculative verifier: which draft tokens to keep, and the
 * token after them. Pure: no llama.cpp, no globals but the error detail;
 * random numbers come in as arguments. */
#include "internal.h"

#include <stdio.h>

int32_t pymoe_verify(int32_t mode, const pymoe_token * draft, int32_t k, const float * q, const float * p,
                     int32_t n_vocab, const double * u, int32_t * n_accepted, pymoe_token * next) {
    if (!p || !n_accepted || !next || n_vocab <= 0 || k < 0 || (k > 0 && !draft)) {
        return pymoe_fail(PYMOE_EINVAL, "verify: need p, n_vocab > 0, k >= 0, the draft tokens and outputs");
    }
    if (mode != PYMOE_VERIFY_GREEDY && mode != PYMOE_VERIFY_STOCHASTIC) {
        return pymoe_fail(PYMOE_EINVAL, "verify: unknown mode %d", mode);
    }
    if (mode == PYMOE_VERIFY_STOCHASTIC && (!u || (k > 0 && !q))) {
        return pymoe_fail(PYMOE_EINVAL, "stochastic verification needs q rows and k + 1 uniforms");
    }
    for (int32_t i = 0; i < k; i++) {
        if (draft[i] < 0 || draft[i] >= n_vocab) {
            return pymoe_fail(PYMOE_ETOKEN, "draft token %d (at %d) is outside the vocabulary [0, %d)", draft[i], i,
                              n_vocab);
        }
    }
    if (mode == PYMOE_VERIFY_STOCHASTIC) {
        for (int32_t i = 0; i <= k; i++) {
            if (!(u[i] >= 0.0 && u[i] < 1.0)) {
                return pymoe_fail(PYMOE_EINVAL, "uniform %d is %g, not in [0, 1)", i, u[i]);
            }
        }
    }

    const size_t n = (size_t) n_vocab;
    if (mode == PYMOE_VERIFY_GREEDY) {
        int32_t     i   = 0;
        pymoe_token top = pymoe_argmax(p, n_vocab);
        while (i < k && top == draft[i]) {
            i++;
            top = pymoe_argmax(p + i * n, n_vocab);
        }
        if (top < 0) {
            char whose[48];
            snprintf(whose, sizeof whose, "the logits of row %d", i);
            return pymoe_row_fail(top, whose);
        }
        *n_accepted = i;
        *next       = top;
        return pymoe_ok();
    }

    for (int32_t i = 0; i < k; i++) {
        const float * pi = p + i * n;
        const float * qi = q + i * n;
        const pymoe_token d = draft[i];
        if (u[i] * qi[d] < pi[d]) {
            continue;  /* accepted with probability min(1, p/q) */
        }
        pymoe_token t = pymoe_draw(pi, qi, n_vocab, 1, u[k]);
        if (t < 0) {
            t = pymoe_draw(pi, NULL, n_vocab, 1, u[k]);  /* p <= q everywhere, so p == q */
        }
        if (t < 0) {
            return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", i);
        }
        *n_accepted = i;
        *next       = t;
        return pymoe_ok();
    }
    pymoe_token t = pymoe_draw(p + k * n, NULL, n_vocab, 1, u[k]);
    if (t < 0) {
        return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", k);
    }
    *n_accepted = k;
    *next       = t;
    return pymoe_ok();
}

/* p of token t in a sparse row (ids ascending): 0 when the row lacks it. */
static float sparse_at(const struct pymoe_sparse_row * r, pymoe_token t) {
    int32_t lo = 0, hi = r->n;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (r->ids[mid] < t) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < r->n && r->ids[lo] == t ? r->p[lo] : 0.0f;
}

/* p[i] - q at the same token (q NULL: p[i]) for p's tokens in ascending
 * order, q walked alongside from *j. */
static double residual_at(const struct pymoe_sparse_row * p, const struct pymoe_sparse_row * q, int32_t i,
                          int32_t * j) {
    if (!q) {
        return p->p[i];
    }
    while (*j < q->n && q->ids[*j] < p->ids[i]) {
        (*j)++;
    }
    const float minus = *j < q->n && q->ids[*j] == p->ids[i] ? q->p[*j] : 0.0f;
    return (double) p->p[i] - minus;
}

/* The dense draw from max(0, p - q) (q NULL: from p), visiting p's tokens in
 * ascending id order: tokens outside p's row weigh nothing, so the sums are
 * the dense verifier's, term for term. -1 when nothing weighs. */
static pymoe_token sparse_draw(const struct pymoe_sparse_row * p, const struct pymoe_sparse_row * q, double u) {
    double  total = 0.0;
    int32_t j     = 0;
    for (int32_t i = 0; i < p->n; i++) {
        const double x = residual_at(p, q, i, &j);
        total += x > 0.0 ? x : 0.0;
    }
    if (!(total > 0.0)) {
        return -1;
    }
    const double target = u * total;
    double       cum    = 0.0;
    int32_t      last   = -1;
    j                   = 0;
    for (int32_t i = 0; i < p->n; i++) {
        const double x = residual_at(p, q, i, &j);
        if (x > 0.0) {
            cum += x;
            last = i;
            if (target < cum) {
                return p->ids[i];
            }
        }
    }
    return p->ids[last];  /* rounding: u * total landed on the total */
}

bool pymoe_sparse_accepts(pymoe_token d, const struct pymoe_sparse_row * q, const struct pymoe_sparse_row * p,
                          double u) {
    return u * sparse_at(q, d) < sparse_at(p, d);  /* accepted with probability min(1, p/q) */
}

static bool sparse_row_ok(const struct pymoe_sparse_row * r, int32_t n_vocab) {
    if (r->n < 0 || (r->n > 0 && (!r->ids || !r->p))) {
        return false;
    }
    for (int32_t i = 0; i < r->n; i++) {
        if (r->ids[i] < 0 || r->ids[i] >= n_vocab || (i > 0 && r->ids[i] <= r->ids[i - 1])) {
            return false;
        }
    }
    return true;
}

int32_t pymoe_verify_sparse(const pymoe_token * draft, int32_t k, const struct pymoe_sparse_row * q,
                            const struct pymoe_sparse_row * p, int32_t n_vocab, const double * u,
                            int32_t * n_accepted, pymoe_token * next) {
    if (!p || !u || !n_accepted || !next || n_vocab <= 0 || k < 0 || (k > 0 && (!draft || !q))) {
        return pymoe_fail(PYMOE_EINVAL, "verify_sparse: need k + 1 p rows, k q rows, the draft tokens, k + 1 "
                                        "uniforms and outputs");
    }
    for (int32_t i = 0; i <= k; i++) {
        if (!(u[i] >= 0.0 && u[i] < 1.0)) {
            return pymoe_fail(PYMOE_EINVAL, "uniform %d is %g, not in [0, 1)", i, u[i]);
        }
        if (!sparse_row_ok(&p[i], n_vocab) || (i < k && !sparse_row_ok(&q[i], n_vocab))) {
            return pymoe_fail(PYMOE_EINVAL, "verify_sparse: row %d's ids are not ascending within [0, %d)", i,
                              n_vocab);
        }
        if (i < k && (draft[i] < 0 || draft[i] >= n_vocab)) {
            return pymoe_fail(PYMOE_ETOKEN, "draft token %d (at %d) is outside the vocabulary [0, %d)", draft[i], i,
                              n_vocab);
        }
    }
    return pymoe_verify_sparse_rows(draft, k, q, p, u, n_accepted, next);
}

int32_t pymoe_verify_sparse_rows(const pymoe_token * draft, int32_t k, const struct pymoe_sparse_row * q,
                                 const struct pymoe_sparse_row * p, const double * u, int32_t * n_accepted,
                                 pymoe_token * next) {
    for (int32_t i = 0; i < k; i++) {
        if (pymoe_sparse_accepts(draft[i], &q[i], &p[i], u[i])) {
            continue;
        }
        pymoe_token t = sparse_draw(&p[i], &q[i], u[k]);
        if (t < 0) {
            t = sparse_draw(&p[i], NULL, u[k]);  /* p <= q everywhere, so p == q */
        }
        if (t < 0) {
            return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", i);
        }
        *n_accepted = i;
        *next       = t;
        return pymoe_ok();
    }
    pymoe_token t = sparse_draw(&p[k], NULL, u[k]);
    if (t < 0) {
        return pymoe_fail(PYMOE_EINVAL, "target row %d has no probability mass", k);
    }
    *n_accepted = k;
    *next       = t;
    return pymoe_ok();
}
