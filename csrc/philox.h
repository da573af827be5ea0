// The noise contract Z(seed, i, j), written once for the host and the device.
// Definition: flatlora_kernels/noise.py (Philox4x32-10, counter (j >> 2, i, 0, 0), lane j & 3,
// uniforms ((x >> 9) + 0.5) * 2^-23, Box-Muller on word pairs (0, 1) and (2, 3)).
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__)
#define FLATLORA_HD __host__ __device__ __forceinline__
#else
#define FLATLORA_HD inline
#endif

namespace flatlora {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t x[4];
};

// Philox4x32-10 on L independent counters at once, in place (rounds outer, lanes inner, so a
// CPU compiler vectorises the lanes; the GPU uses L = 1).
template <int L>
FLATLORA_HD void philox4x32_lanes(uint32_t (&c0)[L], uint32_t (&c1)[L], uint32_t (&c2)[L], uint32_t (&c3)[L],
                                  uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    for (int l = 0; l < L; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kRoundB) * c2[l];
      c0[l] = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      c2[l] = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

FLATLORA_HD Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t a[1] = {c0}, b[1] = {c1}, c[1] = {c2}, d[1] = {c3};
  philox4x32_lanes<1>(a, b, c, d, k0, k1);
  return Words{{a[0], b[0], c[0], d[0]}};
}

constexpr float kPi = 3.14159265358979323846f;

// Exact float in (0, 1): the top 23 bits plus half a step.
FLATLORA_HD float uniform_from_bits(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

FLATLORA_HD void box_muller(uint32_t x_radius, uint32_t x_angle, float& z0, float& z1) {
  const float r = sqrtf(-2.0f * logf(uniform_from_bits(x_radius)));
  const float theta = (2.0f * uniform_from_bits(x_angle) - 1.0f) * kPi;
  z0 = r * cosf(theta);
  z1 = r * sinf(theta);
}

// The four normals Z[row, 4 * quad + l], l = 0..3.
FLATLORA_HD void normals4(uint64_t seed, uint32_t row, uint32_t quad, float out[4]) {
  const Words w = philox4x32(quad, row, 0u, 0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(w.x[0], w.x[1], out[0], out[1]);
  box_muller(w.x[2], w.x[3], out[2], out[3]);
}

}  // namespace flatlora
