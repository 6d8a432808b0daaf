// nextn.cpp - the target's hidden states for an MTP head, from llama.cpp's
// staging API (src/llama-ext.h: C++, exported but not installed). This file
// is the one place that includes it, and it fails to compile when the
// functions pymoe relies on change shape: the pin on an unstable interface.
#include "llama-ext.h"

#include <type_traits>

static_assert(std::is_same<decltype(&llama_set_embeddings_nextn), void (*)(llama_context *, bool, bool)>::value,
              "llama_set_embeddings_nextn changed: pymoe's MTP drafting must be reviewed");
static_assert(std::is_same<decltype(&llama_get_embeddings_nextn_ith), float * (*) (llama_context *, int32_t)>::value,
              "llama_get_embeddings_nextn_ith changed: pymoe's MTP drafting must be reviewed");

extern "C" {

// Every position of every batch a context decodes keeps its hidden state
// (unmasked: the output flags select logits only).
__attribute__((visibility("hidden"))) void pymoe_nextn_keep_all(llama_context * ctx, bool on) {
    llama_set_embeddings_nextn(ctx, on, false);
}

// Only the positions a batch marks for output keep it (an MTP context's drafts).
__attribute__((visibility("hidden"))) void pymoe_nextn_keep_outputs(llama_context * ctx) {
    llama_set_embeddings_nextn(ctx, true, true);
}

// The hidden state of batch index i of the last decode (unmasked), or of
// output i (masked); NULL when there is none (llama.cpp logs why).
__attribute__((visibility("hidden"))) const float * pymoe_nextn_row(llama_context * ctx, int32_t i) {
    return llama_get_embeddings_nextn_ith(ctx, i);
}

}
