// dpe-gguf additions compiled into libllama (see CMakeLists.txt: target_sources(llama ...)).
#include "llama-dpe.h"
#include "dpe-build-info.h"


const char * llama_dpe_build_info(void) {
    return "dpe-gguf " DPE_GGUF_VERSION " patches " DPE_PATCH_SERIES " llama.cpp " DPE_UPSTREAM_COMMIT;
}
