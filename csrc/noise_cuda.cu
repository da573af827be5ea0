// CUDA materialisation of Z(seed) from the shared header: the independent check of what the
// Triton kernels regenerate in registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "philox.h"

namespace flatlora {
namespace {

__global__ void write_noise_kernel(float* out, int64_t m, int64_t n, uint64_t seed) {
  const int64_t quads = (n + 3) / 4;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= m * quads) return;
  const int64_t row = index / quads, quad = index % quads;
  float z[4];
  normals4(seed, static_cast<uint32_t>(row), static_cast<uint32_t>(quad), z);
  float* dst = out + row * n + 4 * quad;
  for (int l = 0; l < 4 && 4 * quad + l < n; ++l) dst[l] = z[l];
}

}  // namespace

at::Tensor generate_noise_cuda(int64_t seed, int64_t m, int64_t n, int64_t device_index) {
  TORCH_CHECK(m >= 0 && n >= 0 && m <= (int64_t{1} << 32) && n <= (int64_t{1} << 34),
              "flatlora native CUDA op: noise shape (", m, ", ", n, ") is outside the contract's index space");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  auto out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_index));
  const int64_t work = m * ((n + 3) / 4);
  if (work == 0) return out;
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  write_noise_kernel<<<static_cast<unsigned int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), m, n, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace flatlora
