// CPU implementation of the Flat-LoRA ops, same semantics as flatlora_kernels/reference.py.
//
// Memory bound: the perturbed weight is built one block of rows at a time: block_rows(n) x n
// elements with block_rows(n) = max(16, 2^20 / n), so each float32 block buffer holds at most
// max(4 MiB, 64 n bytes). The noise generator (noise_cpu.cpp) adds diag(c) Z straight into the
// block, with no temporaries; with the compute-dtype rounding and the product's slice the op's
// extra memory stays within 4 * max(4 MiB, 64 n bytes), whatever m is (measured by
// benchmarks/bench_native_cpu.py). W itself is only read.

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>

#include "noise_cpu.h"
#include "ops.h"
#include "philox.h"

namespace flatlora {
namespace {

constexpr int64_t kBlockElements = int64_t{1} << 20;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "flatlora native CPU op: ", name, " must be a CPU tensor, got ", t.device());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "flatlora native CPU op: ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "flatlora native CPU op: ", name, " must be 2-D, got ", t.dim(), "-D");
}

// Z(seed)[row0 : row0 + rows, col0 : col0 + n] added, scaled by row_scale, to a float32 block of rows
// (row_scale null: written instead).
void add_noise(at::Tensor& block, uint64_t seed, int64_t row0, int64_t col0, const float* row_scale) {
  write_noise(NoiseRows{block.data_ptr<float>(), block.stride(0), block.size(0), block.size(1), seed, row0, col0,
                        row_scale});
}

// A float32 (rows, n) block of the calling thread's scratch buffer, kept between calls and grown to the
// largest block asked for (at most max(4 MiB, 64 n bytes), see block_rows): a fresh buffer of that size
// comes from mmap and is page-faulted in on every call, which took 70 us of a 384 x 384 forward's
// ~270 us on the main job (benchmarks/NOTES.md). The op is not reentrant, so one buffer per thread.
at::Tensor scratch_block(int64_t rows, int64_t n) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < rows * n) buffer = at::empty({rows * n}, at::kFloat);
  return buffer.narrow(0, 0, rows * n).view({rows, n});
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "flatlora native CPU op: unsupported out_dtype '", name, "'");
}

}  // namespace

int64_t block_rows(int64_t n) { return std::max<int64_t>(16, kBlockElements / std::max<int64_t>(n, 1)); }

at::Tensor philox_words(int64_t seed, const at::Tensor& counters) {
  check_cpu(counters, "counters");
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "flatlora native CPU op: counters must be an int64 tensor of shape (N, 4)");
  auto c = counters.contiguous();
  auto out = at::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* words = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < c.size(0); ++i) {
    const int64_t* ctr = in + 4 * i;
    const Words w = philox4x32(static_cast<uint32_t>(ctr[0]), static_cast<uint32_t>(ctr[1]),
                               static_cast<uint32_t>(ctr[2]), static_cast<uint32_t>(ctr[3]),
                               static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
    for (int l = 0; l < 4; ++l) words[4 * i + l] = w.x[l];
  }
  return out;
}

void check_noise_block(int64_t row0, int64_t m, int64_t col0, int64_t n) {
  TORCH_CHECK(m >= 0 && n >= 0 && row0 >= 0 && col0 >= 0 && row0 + m <= (int64_t{1} << 32) &&
                  col0 + n <= (int64_t{1} << 34),
              "flatlora native CPU op: noise block rows [", row0, ", ", row0 + m, ") x columns [", col0, ", ", col0 + n,
              ") is outside the contract's 2^32 x 2^34 index space");
}

at::Tensor generate_noise_cpu(int64_t seed, int64_t m, int64_t n, int64_t row_offset, int64_t col_offset) {
  check_noise_block(row_offset, m, col_offset, n);
  auto out = at::empty({m, n}, at::kFloat);
  add_noise(out, static_cast<uint64_t>(seed), row_offset, col_offset, nullptr);
  return out;
}

at::Tensor merged_row_norms_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling) {
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&lora_A, "lora_A"}, {&lora_B, "lora_B"}}) {
    check_cpu(*t, name);
    check_float(*t, name);
    check_2d(*t, name);
  }
  const int64_t m = weight.size(0), n = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == n && lora_B.size(0) == m && lora_B.size(1) == r,
              "flatlora native CPU op: shapes weight ", weight.sizes(), ", lora_A ", lora_A.sizes(), ", lora_B ",
              lora_B.sizes(), " do not fit (m, n), (r, n), (m, r)");
  auto norms = at::empty({m}, at::kFloat);
  const auto a = lora_A.to(at::kFloat);
  const int64_t rows = block_rows(n);
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t len = std::min(rows, m - r0);
    auto merged = scratch_block(len, n).copy_(weight.narrow(0, r0, len));
    merged.addmm_(lora_B.narrow(0, r0, len).to(at::kFloat), a, /*beta=*/1.0, /*alpha=*/scaling);
    norms.narrow(0, r0, len).copy_(at::linalg_vector_norm(merged, 2, {1}));
  }
  return norms;
}

at::Tensor perturbed_matmul_cpu(const at::Tensor& a, const at::Tensor& weight, bool transpose_weight, int64_t seed,
                                const std::optional<at::Tensor>& row_std, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& lora_left,
                                const std::optional<at::Tensor>& lora_right, double scaling,
                                const std::optional<at::Tensor>& keep, double keep_scale,
                                const std::string& out_dtype_name, int64_t noise_row_offset,
                                int64_t noise_col_offset) {
  const auto out_dtype = parse_dtype(out_dtype_name);
  check_cpu(a, "a");
  check_cpu(weight, "weight");
  check_float(a, "a");
  check_float(weight, "weight");
  check_2d(a, "a");
  check_2d(weight, "weight");
  const int64_t m = weight.size(0), n = weight.size(1), M = a.size(0);
  const int64_t K = transpose_weight ? n : m, N = transpose_weight ? m : n;
  TORCH_CHECK(a.size(1) == K, "flatlora native CPU op: a has ", a.size(1), " columns, expected ", K,
              " for a weight of shape ", weight.sizes(), transpose_weight ? " (forward)" : " (backward)");
  if (row_std) {
    check_cpu(*row_std, "row_std");
    TORCH_CHECK(row_std->scalar_type() == at::kFloat && row_std->dim() == 1 && row_std->size(0) == m,
                "flatlora native CPU op: row_std must be float32 of shape (", m, "), got ", row_std->scalar_type(),
                " ", row_std->sizes());
    check_noise_block(noise_row_offset, m, noise_col_offset, n);
  }
  if (bias) {
    check_cpu(*bias, "bias");
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "flatlora native CPU op: bias must have shape (", N,
                "), got ", bias->sizes());
  }
  TORCH_CHECK(lora_left.has_value() == lora_right.has_value(),
              "flatlora native CPU op: lora_left and lora_right come together");
  if (lora_left) {
    check_cpu(*lora_left, "lora_left");
    check_cpu(*lora_right, "lora_right");
    check_2d(*lora_left, "lora_left");
    check_2d(*lora_right, "lora_right");
    TORCH_CHECK(lora_left->size(0) == M && lora_right->size(1) == N && lora_left->size(1) == lora_right->size(0),
                "flatlora native CPU op: LoRA factors ", lora_left->sizes(), " x ", lora_right->sizes(),
                " do not give a (", M, ", ", N, ") term");
  }
  if (keep) {
    check_cpu(*keep, "keep");
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->sizes() == at::IntArrayRef({M, N}),
                "flatlora native CPU op: keep must be a bool mask of shape (", M, ", ", N, ")");
    TORCH_CHECK(lora_left.has_value(), "flatlora native CPU op: keep applies to the LoRA term, which is missing");
  }

  // a rounded to the compute dtype, then multiplied in float32, as the reference does.
  const auto a_f = a.to(out_dtype).to(at::kFloat);
  auto out = at::zeros({M, N}, at::kFloat);
  const at::Tensor row_scale = row_std ? row_std->contiguous() : at::Tensor();
  const int64_t rows = block_rows(n);
  auto block_buffer = scratch_block(std::min(rows, m), n);
  for (int64_t r0 = 0; r0 < m && M > 0; r0 += rows) {
    const int64_t len = std::min(rows, m - r0);
    auto block = block_buffer.narrow(0, 0, len).copy_(weight.narrow(0, r0, len));
    if (row_std) {
      add_noise(block, static_cast<uint64_t>(seed), noise_row_offset + r0, noise_col_offset,
                row_scale.data_ptr<float>() + r0);
    }
    if (out_dtype != at::kFloat) block = block.to(out_dtype).to(at::kFloat);
    if (transpose_weight && len == m) {
      at::mm_out(out, a_f, block.t());  // one block: straight into the output
    } else if (transpose_weight) {
      out.narrow(1, r0, len).copy_(at::mm(a_f, block.t()));
    } else {
      out.addmm_(a_f.narrow(1, r0, len), block);
    }
  }
  if (lora_left && !keep) {
    out.addmm_(lora_left->to(at::kFloat), lora_right->to(at::kFloat), /*beta=*/1.0, /*alpha=*/scaling);
  } else if (lora_left) {
    auto lora = at::mm(lora_left->to(at::kFloat), lora_right->to(at::kFloat));
    out.add_(lora.mul_(keep->to(at::kFloat)), scaling * keep_scale);
  }
  if (bias) out.add_(bias->to(at::kFloat));
  return out.to(out_dtype);
}

}  // namespace flatlora
