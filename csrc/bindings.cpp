// Python bindings: flatlora_kernels._C
#include "noise_cpu.h"
#include "ops.h"
#include "philox.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flatlora-kernels native ops (C++ CPU; CUDA noise when built with CUDA)";
  m.def("block_rows", &flatlora::block_rows, "rows of the perturbed weight held at once for in_features n");
  m.def("philox_words", &flatlora::philox_words, "Philox4x32-10 words for (N, 4) int64 counters");
  m.def("generate_noise_cpu", &flatlora::generate_noise_cpu, "Z(seed)[r0:r0+m, c0:c0+n], float32 (args seed, m, n, r0, c0)");
  m.def("box_muller_terms_cpu", &flatlora::box_muller_terms_cpu,
        "(65536, 3): radius, cos and sin of each 16-bit half as the CPU generator computes them");
  m.def("cpu_noise_isa", &flatlora::cpu_noise_isa, "instruction set of the CPU noise generator here");
  m.def("contract_version", [] { return flatlora::kContractVersion; }, "noise contract version of this build");
  m.def("merged_row_norms_cpu", &flatlora::merged_row_norms_cpu, "||W_i + s B_i A||, float32 (m,)");
  m.def("perturbed_matmul_cpu", &flatlora::perturbed_matmul_cpu, "a @ op(W + diag(c) Z) + LoRA term + bias");
#ifdef FLATLORA_WITH_CUDA
  m.def("generate_noise_cuda", &flatlora::generate_noise_cuda, "Z(seed)[r0:r0+m, c0:c0+n], float32, on a GPU (args seed, m, n, r0, c0, device)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
