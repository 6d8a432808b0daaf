/* routing.c - which experts the router sent each token to, read through
 * llama.cpp's eval callback on the router's top-k tensors ("ffn_moe_topk-<layer>").
 * For diagnostics only: watching a tensor makes the scheduler stop the graph
 * there, so a session records routing only when asked to. */
#include "internal.h"

#include "ggml-backend.h"

#include <stdlib.h>
#include <string.h>

struct pymoe_routing {
    int32_t   n_layers;
    int32_t   n_used;    /* experts per token, from the first router seen (0: none yet) */
    int32_t   cap;       /* tokens each layer's array holds */
    int32_t * n_tokens;  /* per layer, tokens recorded since the last clear */
    int32_t * ids;       /* per layer, cap x n_used expert ids; grown as feeds need */
    bool      overflow;  /* an allocation failed: what was recorded is incomplete */
};

static const char ROUTER[] = "ffn_moe_topk-";

struct pymoe_routing * pymoe_routing_new(int32_t n_layers) {
    struct pymoe_routing * r = calloc(1, sizeof(*r));
    if (r) {
        r->n_layers = n_layers;
        r->n_tokens = calloc((size_t) n_layers, sizeof(*r->n_tokens));
        if (!r->n_tokens) {
            free(r);
            return NULL;
        }
    }
    return r;
}

void pymoe_routing_free(struct pymoe_routing * r) {
    if (r) {
        free(r->n_tokens);
        free(r->ids);
        free(r);
    }
}

void pymoe_routing_clear(struct pymoe_routing * r) {
    if (r) {
        memset(r->n_tokens, 0, sizeof(*r->n_tokens) * (size_t) r->n_layers);
        r->overflow = false;
    }
}

/* Room for `tokens` tokens per layer (all layers' arrays grow together). */
static bool reserve(struct pymoe_routing * r, int32_t tokens) {
    if (tokens <= r->cap) {
        return true;
    }
    int32_t cap = r->cap ? r->cap : 64;
    while (cap < tokens) {
        cap *= 2;
    }
    const size_t row = (size_t) r->n_used * sizeof(int32_t);
    int32_t *    ids = calloc((size_t) r->n_layers * (size_t) cap, row);
    if (!ids) {
        return false;
    }
    for (int32_t l = 0; l < r->n_layers && r->ids; l++) {
        memcpy((char *) ids + (size_t) l * cap * row, (char *) r->ids + (size_t) l * r->cap * row,
               (size_t) r->n_tokens[l] * row);
    }
    free(r->ids);
    r->ids = ids;
    r->cap = cap;
    return true;
}

int32_t pymoe_routing_layer(const struct ggml_tensor * t) {
    /* exactly "ffn_moe_topk-<layer>": not the views and copies ggml names after it ("... (cont)") */
    char *     end   = NULL;
    const long layer = strncmp(t->name, ROUTER, sizeof(ROUTER) - 1) == 0
                           ? strtol(t->name + sizeof(ROUTER) - 1, &end, 10) : -1;
    return end && *end == '\0' && end != t->name + sizeof(ROUTER) - 1 && layer >= 0 && layer < INT32_MAX
               ? (int32_t) layer : -1;
}

bool pymoe_routing_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    struct pymoe_routing * r     = user_data;
    const int32_t          layer = pymoe_routing_layer(t);
    if (layer < 0) {
        return ask ? false : true;  /* not watched; when computed, carry on */
    }
    if (ask) {
        return true;
    }
    const int32_t used  = (int32_t) t->ne[0];
    const int32_t n     = (int32_t) t->ne[1];
    if (t->type != GGML_TYPE_I32 || layer >= r->n_layers || used <= 0 || n <= 0 ||
        (r->n_used && used != r->n_used) || t->nb[0] != sizeof(int32_t) || t->nb[1] < used * sizeof(int32_t)) {
        return true;  /* not the tensor this reader knows: leave it */
    }
    r->n_used = used;
    if (!reserve(r, r->n_tokens[layer] + n)) {
        r->overflow = true;
        return true;
    }
    /* the rows are a view of the router's sorted experts: each row's first
     * n_used ids, rows nb[1] bytes apart (in device memory on a GPU) */
    const size_t row  = (size_t) used * sizeof(int32_t);
    const size_t span = (size_t) (n - 1) * t->nb[1] + row;
    const bool   host = !t->buffer || ggml_backend_buffer_is_host(t->buffer);
    char *       src  = host ? t->data : malloc(span);
    if (!src) {
        r->overflow = true;
        return true;
    }
    if (!host) {
        ggml_backend_tensor_get(t, src, 0, span);
    }
    int32_t * dst = r->ids + ((size_t) layer * r->cap + (size_t) r->n_tokens[layer]) * (size_t) used;
    for (int32_t i = 0; i < n; i++) {
        memcpy(dst + (size_t) i * used, src + (size_t) i * t->nb[1], row);
    }
    if (!host) {
        free(src);
    }
    r->n_tokens[layer] += n;
    return true;
}

bool pymoe_routing_get(const struct pymoe_routing * r, int32_t layer, const int32_t ** ids, int32_t * n_used,
                       int32_t * n_tokens) {
    if (!r || layer < 0 || layer >= r->n_layers || r->overflow || !r->ids || r->n_tokens[layer] == 0) {
        return false;
    }
    *n_used   = r->n_used;
    *n_tokens = r->n_tokens[layer];
    *ids      = r->ids + (size_t) layer * r->cap * (size_t) r->n_used;
    return true;
}

int32_t pymoe_session_routing(const pymoe_session * s, int32_t layer, const int32_t ** experts, int32_t * n_used,
                              int32_t * n_tokens) {
    if (!s || !experts || !n_used || !n_tokens) {
        return pymoe_fail(PYMOE_EINVAL, "pymoe_session_routing: NULL argument");
    }
    const struct pymoe_routing * r = s->routing;
    if (!r) {
        return pymoe_fail(PYMOE_ESTATE, "this session does not record routing: create it with record_routing");
    }
    if (layer < 0 || layer >= r->n_layers) {
        return pymoe_fail(PYMOE_EINVAL, "layer %d is outside [0, %d)", layer, r->n_layers);
    }
    if (r->overflow) {
        return pymoe_fail(PYMOE_ENOMEM, "out of memory while recording the routing of the last feed");
    }
    *n_used   = r->n_used;
    *n_tokens = r->n_tokens[layer];
    *experts  = r->ids ? r->ids + (size_t) layer * r->cap * (size_t) r->n_used : NULL;
    return pymoe_ok();
}
