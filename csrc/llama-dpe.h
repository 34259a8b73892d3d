// dpe-gguf: DPE (Dimension-Wise Positional Embeddings Manipulation) for llama.cpp.
// Declarations shared by the patched llama.cpp tree and dpe-gguf's own native code.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// "dpe-gguf <version> patches <series id> llama.cpp <commit>": identifies a patched libllama.
// Its presence (a symbol stock llama.cpp lacks) is how dpe_gguf checks which libllama it loaded.
LLAMA_API const char * llama_dpe_build_info(void);

#ifdef __cplusplus
}
#endif
