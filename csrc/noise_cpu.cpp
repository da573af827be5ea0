// The native CPU noise generator: noise_cpu_kernel.h compiled for AVX-512, AVX2 and a portable
// baseline, the widest the CPU supports picked at run time.
#include "noise_cpu.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "philox.h"

namespace flatlora {

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace noise_avx512 {
#define FLATLORA_VECTOR_BITS 512
#include "noise_cpu_kernel.h"
#undef FLATLORA_VECTOR_BITS
}  // namespace noise_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace noise_avx2 {
#define FLATLORA_VECTOR_BITS 256
#include "noise_cpu_kernel.h"
#undef FLATLORA_VECTOR_BITS
}  // namespace noise_avx2
#pragma GCC pop_options
#endif

namespace noise_portable {
#define FLATLORA_VECTOR_BITS 0
#include "noise_cpu_kernel.h"
#undef FLATLORA_VECTOR_BITS
}  // namespace noise_portable

namespace {

struct Isa {
  const char* name;
  bool (*supported)();
  void (*rows)(const NoiseRows&, int64_t, int64_t);
  void (*terms)(float*, float*, float*);
};

const Isa kIsas[] = {
#if defined(__x86_64__)
    {"avx512", [] { return __builtin_cpu_supports("avx512f") != 0; }, noise_avx512::noise_rows,
     noise_avx512::box_muller_terms},
    {"avx2", [] { return __builtin_cpu_supports("avx2") != 0; }, noise_avx2::noise_rows,
     noise_avx2::box_muller_terms},
#endif
    {"portable", [] { return true; }, noise_portable::noise_rows, noise_portable::box_muller_terms},
};

const Isa& chosen_isa() {
  const char* wanted = std::getenv("FLATLORA_CPU_NOISE_ISA");
  for (const Isa& isa : kIsas) {
    if (isa.supported() && (!wanted || !*wanted || std::strcmp(wanted, isa.name) == 0)) return isa;
  }
  TORCH_CHECK(false, "flatlora native CPU op: FLATLORA_CPU_NOISE_ISA=", wanted,
              " is not an instruction set this CPU has (avx512, avx2, portable)");
}

// About 32k normals per work item: ~30 us on one core, so items are many and small.
constexpr int64_t kItemElements = int64_t{1} << 15;

}  // namespace

std::string cpu_noise_isa() { return chosen_isa().name; }

namespace {

// Items of a write_noise call, claimed from a shared counter by the threads of one parallel region:
// a thread that starts late (descheduled, or still finishing the previous region) takes fewer
// items instead of holding a fixed share.
struct NoiseWork {
  NoiseRows task;
  void (*rows_fn)(const NoiseRows&, int64_t, int64_t);
  int64_t rows_per_item, items;
  std::atomic<int64_t> next{0};

  void run() {
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t begin = item * rows_per_item;
      rows_fn(task, begin, std::min(task.rows, begin + rows_per_item));
    }
  }
};

}  // namespace

void write_noise(const NoiseRows& task) {
  if (task.rows <= 0 || task.cols <= 0) return;
  NoiseWork work;
  work.task = task;
  work.rows_fn = chosen_isa().rows;
  work.rows_per_item = std::max<int64_t>(1, kItemElements / task.cols);
  work.items = (task.rows + work.rows_per_item - 1) / work.rows_per_item;
  // ATen's intra-op (OpenMP) threads, the ones the GEMMs around this call use: right after a GEMM
  // they are awake, where helpers on the inter-op pool first had to be scheduled (on 2 cores the
  // 384 x 384 noise of the main job got no help from them at all: benchmarks/NOTES.md).
  const int64_t threads = std::min<int64_t>(work.items, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&work](int64_t, int64_t) { work.run(); });
}

at::Tensor box_muller_terms_cpu() {
  auto out = at::empty({3, 65536}, at::kFloat);
  float* p = out.data_ptr<float>();
  chosen_isa().terms(p, p + 65536, p + 2 * 65536);
  return out.t();
}

}  // namespace flatlora
