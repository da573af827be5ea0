// CUDA materialisation of Z(seed) from the shared header: the independent check of what the
// Triton kernels regenerate in registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "philox.h"

namespace flatlora {
namespace {

// One thread per Philox call: out[i, j] = Z[row0 + i, col0 + j]; the calls cover columns from
// 8 * (col0 / 8), so the first and last may be cut.
__global__ void write_noise_kernel(float* out, int64_t m, int64_t n, int64_t row0, int64_t col0, uint64_t seed) {
  const int64_t skip = col0 % kNormalsPerCall, calls = (skip + n + kNormalsPerCall - 1) / kNormalsPerCall;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= m * calls) return;
  const int64_t row = index / calls, call = index % calls;
  float z[kNormalsPerCall];
  normals8(seed, static_cast<uint32_t>(row0 + row), static_cast<uint32_t>(col0 / kNormalsPerCall + call), z);
  for (int l = 0; l < kNormalsPerCall; ++l) {
    const int64_t col = kNormalsPerCall * call + l - skip;
    if (col >= 0 && col < n) out[row * n + col] = z[l];
  }
}

}  // namespace

at::Tensor generate_noise_cuda(int64_t seed, int64_t m, int64_t n, int64_t row_offset, int64_t col_offset,
                               int64_t device_index) {
  TORCH_CHECK(m >= 0 && n >= 0 && row_offset >= 0 && col_offset >= 0 && row_offset + m <= (int64_t{1} << 32) &&
                  col_offset + n <= (int64_t{1} << 34),
              "flatlora native CUDA op: noise block rows [", row_offset, ", ", row_offset + m, ") x columns [",
              col_offset, ", ", col_offset + n, ") is outside the contract's 2^32 x 2^34 index space");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  auto out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_index));
  const int64_t work = m * ((col_offset % kNormalsPerCall + n + kNormalsPerCall - 1) / kNormalsPerCall);
  if (work == 0) return out;
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  write_noise_kernel<<<static_cast<unsigned int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), m, n, row_offset, col_offset, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace flatlora
