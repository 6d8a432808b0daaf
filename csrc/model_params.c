/* model_params.c - a model's load params: the defaults, and a caller's struct
 * read over them (its size says which fields it has; pymoe.h, Conventions).
 * Both the load and the memory plan read them. */
#include "internal.h"

PYMOE_PARAMS_END_AT(struct pymoe_model_params, moe_cache_uploads);

static const struct pymoe_model_params DEFAULTS = {
    .size              = sizeof(struct pymoe_model_params),
    .load_mode         = PYMOE_LOAD_AUTO,  /* the point of pymoe: weights read once, locked, never paged */
    .n_gpu_layers      = -1,
    .moe_cache_uploads = 1,
};

void pymoe_model_params_init(struct pymoe_model_params * params, size_t size) {
    pymoe_struct_init(params, &DEFAULTS, sizeof(DEFAULTS), size);
}

int32_t pymoe_model_params_in(const struct pymoe_model_params * params, struct pymoe_model_params * local) {
    *local = DEFAULTS;
    return pymoe_struct_in(params, local, sizeof(*local), PYMOE_PARAMS_V1(struct pymoe_model_params, moe_cache_uploads),
                           "pymoe_model_params");
}
