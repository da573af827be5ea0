// The native CPU noise generator (contract version 2, see flatlora_kernels/noise.py).
#pragma once

#include <cstdint>
#include <string>

namespace flatlora {

// out[r * ld + j] = Z(seed)[row0 + r, col0 + j] for r < rows, j < cols, or, with row_scale,
// out[r * ld + j] += row_scale[r] * Z(...): the noise goes straight into the perturbed weight block.
struct NoiseRows {
  float* out;
  int64_t ld;
  int64_t rows, cols;
  uint64_t seed;
  int64_t row0, col0;
  const float* row_scale;
};

// Runs a NoiseRows task on ATen's intra-op threads (at most at::get_num_threads()). Work is handed out
// in small items (~32k normals) from a shared counter, so a thread that starts late takes fewer items;
// the region still ends when every thread has arrived, as torch's own parallel ops do.
void write_noise(const NoiseRows& task);

// The instruction set the generator uses here: "avx512", "avx2" or "portable" (the best the CPU
// has, or FLATLORA_CPU_NOISE_ISA when that names one it has; all give the same bits).
std::string cpu_noise_isa();

}  // namespace flatlora
