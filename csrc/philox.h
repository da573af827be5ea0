// The noise contract Z(seed, i, j), written once for the host and the device.
// Definition: flatlora_kernels/noise.py, contract version 2 (Philox4x32-10, counter (j >> 3, i, 0, 0),
// output j & 7; word p gives outputs 2p, 2p + 1 by Box-Muller on midpoint uniforms of its 16-bit halves:
// the low half for the radius, the high half for the angle).
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

constexpr int kContractVersion = 2;
constexpr int kNormalsPerCall = 8;
constexpr float kPi = 3.14159265358979323846f;

// Exact float in (0, 1): the 16-bit half h plus half a step, (h + 0.5) * 2^-16.
FLATLORA_HD float uniform_from_half(uint32_t h) { return (static_cast<float>(h) + 0.5f) * 1.52587890625e-05f; }

// One word to its two normals (cos term, sin term), in float32 as the contract writes it.
FLATLORA_HD void box_muller(uint32_t x, float& z_cos, float& z_sin) {
  const float r = sqrtf(-2.0f * logf(uniform_from_half(x & 0xFFFFu)));
  const float theta = (2.0f * uniform_from_half(x >> 16) - 1.0f) * kPi;
  z_cos = r * cosf(theta);
  z_sin = r * sinf(theta);
}

// The eight normals Z[row, 8 * call + l], l = 0..7.
FLATLORA_HD void normals8(uint64_t seed, uint32_t row, uint32_t call, float out[8]) {
  const Words w = philox4x32(call, row, 0u, 0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int p = 0; p < 4; ++p) box_muller(w.x[p], out[2 * p], out[2 * p + 1]);
}

}  // namespace flatlora
