// Helpers shared by the kernel files of paddle_cae/fast/kernels (block.cc, optimizer.cc,
// tokenizer.cc), compiled into one Paddle custom-operator extension: OpenMP thread queries,
// output allocation, argument checks, double-accumulated column sums, and MKL's sgemm from the
// library the Paddle CPU wheel ships (paddle/libs/libmklml_intel.so, found through the
// extension's runpath) with a guard that keeps MKL single-threaded on an OpenMP thread.
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline paddle::Tensor empty(const std::vector<int64_t>& shape, const paddle::Tensor& like) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, like.place());
}

inline void check_f32(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, what, " must be float32");
  PD_CHECK(t.is_cpu(), what, " must be on the CPU");
}

// Sum the rows of a [rows, cols] buffer into out[cols] (double accumulation, fixed order).
inline void column_sums(const float* src, int64_t rows, int64_t cols, float* out) {
  const int64_t block = 64;
  const int64_t nblocks = (cols + block - 1) / block;
#pragma omp parallel for schedule(static)
  for (int64_t bi = 0; bi < nblocks; ++bi) {
    const int64_t c0 = bi * block;
    const int64_t c1 = std::min(cols, c0 + block);
    double acc[64] = {0.0};
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = src + r * cols;
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row[c];
    }
    for (int64_t c = c0; c < c1; ++c) out[c] = static_cast<float>(acc[c - c0]);
  }
}

}  // namespace

namespace {
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);
using SetThreadsLocalFn = int (*)(int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Mkl {
  SgemmFn sgemm = nullptr;
  SetThreadsLocalFn set_threads_local = nullptr;
};

inline const Mkl& mkl() {
  static const Mkl lib = [] {
    Mkl m;
    void* handle = dlopen("libmklml_intel.so", RTLD_LAZY | RTLD_LOCAL);
    if (handle) {
      m.sgemm = reinterpret_cast<SgemmFn>(dlsym(handle, "cblas_sgemm"));
      m.set_threads_local = reinterpret_cast<SetThreadsLocalFn>(
          dlsym(handle, "MKL_Set_Num_Threads_Local"));  // C API (by value)
    }
    return m;
  }();
  return lib;
}

// MKL single-threaded on this OpenMP thread for the scope (each thread runs its own products)
class MklSequential {
 public:
  MklSequential() : prev_(mkl().set_threads_local ? mkl().set_threads_local(1) : 0) {}
  ~MklSequential() {
    if (mkl().set_threads_local) mkl().set_threads_local(prev_);
  }

 private:
  int prev_;
};
}  // namespace
