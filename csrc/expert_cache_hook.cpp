// expert_cache_hook.cpp - the two llama.cpp functions the expert cache needs,
// from pymoe's patch over the pinned source (patches/0001-expert-cache.patch,
// docs/llama_patches.md) through llama.cpp's staging header. Built against a
// llama.cpp without the patch, there is no cache: pymoe_llama_has_expert_cache
// says so and the rest does nothing.
#include "llama-ext.h"

extern "C" {

__attribute__((visibility("hidden"))) bool pymoe_llama_has_expert_cache(void) {
#ifdef PYMOE_EXPERT_CACHE_PATCH
    return true;
#else
    return false;
#endif
}

// The model's tensor of that GGUF name; NULL when it has none (or without the patch).
__attribute__((visibility("hidden"))) ggml_tensor * pymoe_llama_tensor(const llama_model * model, const char * name) {
#ifdef PYMOE_EXPERT_CACHE_PATCH
    return llama_model_get_tensor_by_name(model, name);
#else
    (void) model;
    (void) name;
    return nullptr;
#endif
}

// Graphs of at most max_tokens tokens read w's experts from cache where slot_of says so
// (cache == NULL: no longer).
__attribute__((visibility("hidden"))) void pymoe_llama_expert_cache(const ggml_tensor * w, ggml_tensor * cache,
                                                                    ggml_tensor * slot_of, ggml_tensor * host_of,
                                                                    int32_t max_tokens) {
#ifdef PYMOE_EXPERT_CACHE_PATCH
    if (cache) {
        llama_expert_cache_set(w, cache, slot_of, host_of, max_tokens);
    } else {
        llama_expert_cache_clear(w);
    }
#else
    (void) w;
    (void) cache;
    (void) slot_of;
    (void) host_of;
    (void) max_tokens;
#endif
}

}
