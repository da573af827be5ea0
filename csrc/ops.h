// Declarations of the native ops bound in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>

namespace flatlora {

// Rows of the perturbed weight held at once by the CPU ops (see ops_cpu.cpp).
int64_t block_rows(int64_t n);

// Philox4x32-10 words of (N, 4) counters under a 64-bit key: the raw stream, for tests.
at::Tensor philox_words(int64_t seed, const at::Tensor& counters);

// r(h), cos and sin of the angle of every 16-bit half h as the CPU generator computes them: (65536, 3).
at::Tensor box_muller_terms_cpu();

// Z(seed)[row_offset : row_offset + m, col_offset : col_offset + n].
at::Tensor generate_noise_cpu(int64_t seed, int64_t m, int64_t n, int64_t row_offset, int64_t col_offset);
at::Tensor merged_row_norms_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling);
at::Tensor perturbed_matmul_cpu(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight, int64_t seed,
                                const std::optional<at::Tensor>& row_std, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& lora_left,
                                const std::optional<at::Tensor>& lora_right, double scaling,
                                const std::optional<at::Tensor>& keep, double keep_scale,
                                const std::string& out_dtype, int64_t noise_row_offset, int64_t noise_col_offset);

#ifdef FLATLORA_WITH_CUDA
at::Tensor generate_noise_cuda(int64_t seed, int64_t m, int64_t n, int64_t row_offset, int64_t col_offset,
                               int64_t device_index);
#endif

}  // namespace flatlora
