// The CPU noise kernel body, compiled once per instruction set by noise_cpu.cpp: it is included
// inside a namespace and a `#pragma GCC target` region, with FLATLORA_VECTOR_BITS set to 512, 256 or
// 0 (portable). No include guard on purpose.
//
// Sixteen Philox calls (128 normals of one row) per step, all in 64-byte vectors (GCC vector
// extensions: one zmm register, two ymm halves, or four SSE quarters). Only IEEE add, multiply,
// sqrt and exact conversions are used, with no FMA contraction (-ffp-contract=off), so every
// path yields the same bits. ln, cos and sin are our own polynomials, checked exhaustively over
// all 65,536 radius and angle values by tests/test_native.py against the float64 contract.

typedef uint32_t U32 __attribute__((vector_size(64)));
typedef int32_t I32 __attribute__((vector_size(64)));
typedef uint64_t U64 __attribute__((vector_size(64)));
typedef float F32 __attribute__((vector_size(64)));

#define FLATLORA_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;
constexpr int kGroupColumns = kLanes * kNormalsPerCall;

// High words of c * k for the sixteen lanes: even and odd lanes as two sets of 32x32 -> 64-bit products.
FLATLORA_INLINE U32 mulhi(U32 c, uint64_t k) {
  const U64 even = ((U64)c & 0xFFFFFFFFull) * k;
  const U64 odd = ((U64)c >> 32) * k;
  return (U32)((even >> 32) | (odd & 0xFFFFFFFF00000000ull));
}

// Philox4x32-10 on sixteen counters (c0 = first_call + lane, c1 = row, c2 = c3 = 0); the first round
// is written out because its c2 = 0 product vanishes.
FLATLORA_INLINE void philox16(U32 calls, uint32_t row, uint32_t k0, uint32_t k1, U32 (&x)[4]) {
  U32 c0 = (U32){} + (row ^ k0), c1 = (U32){}, c2 = mulhi(calls, kRoundA) ^ k1, c3 = calls * kRoundA;
  for (int round = 1; round < kRounds; ++round) {
    k0 += kKeyA;
    k1 += kKeyB;
    const U32 hi_a = mulhi(c0, kRoundA), lo_a = c0 * kRoundA;
    const U32 hi_b = mulhi(c2, kRoundB), lo_b = c2 * kRoundB;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
  }
  x[0] = c0;
  x[1] = c1;
  x[2] = c2;
  x[3] = c3;
}

FLATLORA_INLINE F32 vector_sqrt(F32 v) {
#if FLATLORA_VECTOR_BITS == 512
  return (F32)_mm512_sqrt_ps((__m512)v);
#elif FLATLORA_VECTOR_BITS == 256
  __m256 half[2];
  __builtin_memcpy(half, &v, sizeof v);
  half[0] = _mm256_sqrt_ps(half[0]);
  half[1] = _mm256_sqrt_ps(half[1]);
  __builtin_memcpy(&v, half, sizeof v);
  return v;
#else
  for (int l = 0; l < kLanes; ++l) v[l] = __builtin_sqrtf(v[l]);
  return v;
#endif
}

// ln(1 + f) = f - f^2/2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]: P fitted (least squares on
// Chebyshev nodes, float64) to 8e-9 absolute.
FLATLORA_INLINE F32 log1p_reduced(F32 f) {
  F32 p = f * -0.0810227021574974f + 0.1271267831325531f;
  p = p * f + -0.12972144782543182f;
  p = p * f + 0.14202114939689636f;
  p = p * f + -0.166422501206398f;
  p = p * f + 0.20001471042633057f;
  p = p * f + -0.2500029504299164f;
  p = p * f + 0.333333283662796f;
  const F32 f2 = f * f;
  return f + (f2 * (f * p) - 0.5f * f2);
}

// The radius sqrt(-2 ln u) of u = (a + 0.5) 2^-16, a the low half of each word.
FLATLORA_INLINE F32 radius(U32 x) {
  const F32 u = (__builtin_convertvector((I32)(x & 0xFFFFu), F32) + 0.5f) * 1.52587890625e-05f;
  const I32 bits = (I32)u;
  // u = 2^e m with m in [sqrt(1/2), sqrt(2)): mantissas at or above sqrt(2) move down one octave.
  // (Near u = 1 this leaves e = 0 and f = m - 1 exact, so ln u keeps its relative accuracy.)
  const I32 high = (bits & 0x7FFFFF) > 0x3504F3;  // -1 where m >= sqrt(2)
  const I32 m_bits = ((bits & 0x7FFFFF) | 0x3F800000) - (high & 0x00800000);
  const F32 e = __builtin_convertvector(((bits >> 23) - 127) - high, F32);
  const F32 ln_u = e * 0.693145751953125f + (log1p_reduced((F32)m_bits - 1.0f) + e * 1.428606765330187e-06f);
  return vector_sqrt(ln_u * -2.0f);
}

// cos(pi t) and sin(pi t) of t = (b + 0.5) 2^-15 - 1, b the high half of each word. With
// T = 2b - 65535 (so t = T 2^-16), k = round(T / 2^15) and y = (T - k 2^15) 2^-16 in [-1/4, 1/4]:
// pi t = k pi/2 + pi y, all exact in integers.
FLATLORA_INLINE void cos_sin(U32 x, F32& cos_out, F32& sin_out) {
  const I32 t = (I32)((x >> 16) << 1) - 65535;
  const I32 k = (t + 16384) >> 15;
  const F32 y = __builtin_convertvector(t - (k << 15), F32) * 1.52587890625e-05f;
  const F32 y2 = y * y;
  // sin(pi y) = y S(y^2), cos(pi y) = C(y^2), fitted to 2.4e-9 and 5e-11 on |y| <= 1/4.
  F32 s = y2 * -0.5890768766403198f + 2.549767017364502f;
  s = s * y2 + -5.167707920074463f;
  s = (s * y2 + 3.1415927410125732f) * y;
  F32 c = y2 * 0.23132924735546112f + -1.335044503211975f;
  c = c * y2 + 4.058707237243652f;
  c = c * y2 + -4.934802055358887f;
  c = c * y2 + 1.0f;
  // Quadrant q = k mod 4: cos(pi t) = (c, -s, -c, s)[q], sin(pi t) = (s, c, -s, -c)[q].
  const I32 q = k & 3;
  const I32 swap = -(q & 1);
  const I32 ci = (I32)c, si = (I32)s;
  const I32 cos_bits = ci ^ ((ci ^ si) & swap), sin_bits = si ^ ((ci ^ si) & swap);
  cos_out = (F32)(cos_bits ^ (((q + 1) & 2) << 30));
  sin_out = (F32)(sin_bits ^ ((q & 2) << 30));
}

// The 128 normals of sixteen calls in column order: output 2p + s of lane l goes to 8 l + 2p + s.
FLATLORA_INLINE void normals128(U32 calls, uint32_t row, uint32_t k0, uint32_t k1, float* tile) {
  U32 x[4];
  philox16(calls, row, k0, k1, x);
  F32 zc[4], zs[4];
  for (int p = 0; p < 4; ++p) {
    const F32 r = radius(x[p]);
    cos_sin(x[p], zc[p], zs[p]);
    zc[p] *= r;
    zs[p] *= r;
  }
  // Transpose (pair, term) x lane in three interleaving stages: 32-bit, 64-bit, 128-bit units.
  const I32 lo32 = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const I32 hi32 = lo32 + 8;
  const I32 lo64 = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
  const I32 hi64 = lo64 + 8;
  const I32 lo128 = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  const I32 hi128 = lo128 + 8;
  for (int half = 0; half < 2; ++half) {  // lanes 0-7, then 8-15
    F32 pairs[4];
    for (int p = 0; p < 4; ++p) pairs[p] = __builtin_shuffle(zc[p], zs[p], half ? hi32 : lo32);
    const F32 e01[2] = {__builtin_shuffle(pairs[0], pairs[1], lo64), __builtin_shuffle(pairs[0], pairs[1], hi64)};
    const F32 e23[2] = {__builtin_shuffle(pairs[2], pairs[3], lo64), __builtin_shuffle(pairs[2], pairs[3], hi64)};
    for (int quarter = 0; quarter < 2; ++quarter) {
      const F32 first = __builtin_shuffle(e01[quarter], e23[quarter], lo128);
      const F32 second = __builtin_shuffle(e01[quarter], e23[quarter], hi128);
      __builtin_memcpy(tile + 64 * half + 32 * quarter, &first, sizeof first);
      __builtin_memcpy(tile + 64 * half + 32 * quarter + 16, &second, sizeof second);
    }
  }
}

// Rows [begin, end) of a NoiseRows task (see noise_cpu.h).
void noise_rows(const NoiseRows& task, int64_t begin, int64_t end) {
  const uint32_t k0 = static_cast<uint32_t>(task.seed), k1 = static_cast<uint32_t>(task.seed >> 32);
  const int64_t first_call = task.col0 / kNormalsPerCall, skip = task.col0 % kNormalsPerCall;
  const int64_t calls = (skip + task.cols + kNormalsPerCall - 1) / kNormalsPerCall;
  const U32 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  alignas(64) float tile[kGroupColumns];
  for (int64_t r = begin; r < end; ++r) {
    float* out = task.out + r * task.ld;
    const uint32_t row = static_cast<uint32_t>(task.row0 + r);
    const float scale = task.row_scale ? task.row_scale[r] : 0.0f;
    for (int64_t g = 0; g < calls; g += kLanes) {
      normals128(lane + static_cast<uint32_t>(first_call + g), row, k0, k1, tile);
      // Tile element t is column kNormalsPerCall * g + t - skip of the block.
      const int64_t offset = kNormalsPerCall * g - skip;
      const int64_t t_begin = std::max<int64_t>(0, -offset);
      const int64_t t_end = std::min<int64_t>(kGroupColumns, task.cols - offset);
      if (task.row_scale) {
        for (int64_t t = t_begin; t < t_end; ++t) out[offset + t] += scale * tile[t];
      } else {
        for (int64_t t = t_begin; t < t_end; ++t) out[offset + t] = tile[t];
      }
    }
  }
}

// r(h), cos and sin of the angle for each 16-bit h (the low half feeds r, the high half the angle).
void box_muller_terms(float* r, float* cos_out, float* sin_out) {
  const U32 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (uint32_t h = 0; h < 65536; h += kLanes) {
    const U32 x = (lane + h) * 0x10001u;  // the same h in both halves
    const F32 radii = radius(x);
    F32 c, s;
    cos_sin(x, c, s);
    __builtin_memcpy(r + h, &radii, sizeof radii);
    __builtin_memcpy(cos_out + h, &c, sizeof c);
    __builtin_memcpy(sin_out + h, &s, sizeof s);
  }
}

#undef FLATLORA_INLINE
