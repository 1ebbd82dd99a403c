// Block kernels: the transformer block's elementwise and attention operations (float32,
// dynamic graph), each with its backward. Python wrappers and the Paddle operators each one
// replaces ("Reference"): paddle_cae/fast/kernels/block.py.
//
// Each kernel computes what the sequence of Paddle operators it replaces computes, in fewer
// passes over memory, spread over the OpenMP threads, and with the inner loops vectorized. What
// may differ is float32 rounding: exp and the normal CDF are this file's own vectorizable
// versions (within a couple of ulp), row sums of softmax are vectorized reductions, and the
// reductions into bias and norm-weight gradients accumulate in double.
#include "common.h"

namespace {
// ------------------------------------------------------------- vectorizable float math
// Branch-free float32 exp and normal CDF/PDF, written so that the compiler vectorizes them
// inside `#pragma omp simd` loops (built with -fno-trapping-math, so that both sides of a
// select may be computed; libm's expf/erff calls are scalar). Accuracy, measured against double-precision references by
// tests/test_fused_ops.py: softmax within 6 ulp; the normal CDF within 1.5e-7 absolute (GELU's
// own formula 0.5 * (1 + erf(z / sqrt 2)) in float32 is within 0.5e-7).

// e^x for x <= 0 (the only use here: softmax's x - max and the Gaussian exp(-z^2 / 2)).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor polynomial of e^r
// (truncation < 1e-8 relative), times 2^n built in the exponent bits. Below -87.33 (where
// e^x leaves the normal floats) the result is 0.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.33f);
  // nearest integer by the 1.5 * 2^23 trick (no SSE4.1 rounding instruction needed)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693145751953125f;  // ln2 rounded to 16 bits: n * it is exact
  r = r - n * 1.42860682030941723212e-6f;  // the rest of ln2
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.33f ? 0.0f : p * two_n;
}

// Standard normal CDF Phi(z) = 0.5 * (1 + erf(z / sqrt 2)), given e = exp(-z^2 / 2)
// (the PDF is e / sqrt(2 pi)). With a = |z| / sqrt 2:
//   a < 0.75: erf(a) = a * sum_n c_n a^(2n), the Taylor series 2/sqrt(pi) (-1)^n / (n! (2n+1))
//             to n = 10 (remainder < 1e-9);
//   else:     erfc(a) = e * R(a), with R(a) = erfc(a) exp(a^2) a degree-10 polynomial in
//             s = (t - 0.625) * 8/3, t = 1 / (1 + a/2), a least-squares Chebyshev fit over
//             a in [0, 6] (relative error 2e-9; a is capped at 6, where erfc(a) < 3e-17;
//             the coefficients are made by paddle_cae/ops/cdf_coefficients.py).
// `e` is gauss(z) = exp(-z^2 / 2), which GELU's gradient needs as well.
inline float gauss(float z) { return exp_nonpositive(-0.5f * z * z); }

inline float normal_cdf(float z, float e) {
  const float a = std::fabs(z) * 0.70710678118654752f;
  const float a2 = 0.5f * z * z;
  float q = 1.480719281e-08f;
  q = q * a2 - 1.636584415e-07f;
  q = q * a2 + 1.646211444e-06f;
  q = q * a2 - 1.492565025e-05f;
  q = q * a2 + 1.205533263e-04f;
  q = q * a2 - 8.548327023e-04f;
  q = q * a2 + 5.223977845e-03f;
  q = q * a2 - 2.686617151e-02f;
  q = q * a2 + 1.128379181e-01f;
  q = q * a2 - 3.761263788e-01f;
  q = q * a2 + 1.128379226e+00f;
  const float half_erf = 0.5f * (a * q);
  const float t = 1.0f / (1.0f + 0.5f * std::min(a, 6.0f));
  const float u = (t - 0.625f) * 2.66666667f;
  float R = 2.231824283e-06f;
  R = R * u - 4.679798167e-06f;
  R = R * u - 2.201831558e-05f;
  R = R * u + 1.008370382e-04f;
  R = R * u + 1.332314423e-04f;
  R = R * u - 1.665469841e-03f;
  R = R * u - 1.670161844e-03f;
  R = R * u + 3.299344704e-02f;
  R = R * u + 1.694075912e-01f;
  R = R * u + 4.221875966e-01f;
  R = R * u + 3.785374165e-01f;
  const float half_erfc = 0.5f * (e * R);
  const bool near = a < 0.75f;
  const bool pos = z >= 0.0f;
  const float near_cdf = pos ? 0.5f + half_erf : 0.5f - half_erf;
  const float far_cdf = pos ? 1.0f - half_erfc : half_erfc;
  return near ? near_cdf : far_cdf;
}

constexpr float kInvSqrt2Pi = 0.398942280401432678f;

// Per-thread double partial sums of C columns: each OpenMP thread adds into mine(), then
// reduce() writes the sums over the threads, in thread order, as float.
class ColumnPartials {
 public:
  explicit ColumnPartials(int64_t C)
      : C_(C), T_(num_threads()), part_(static_cast<size_t>(T_) * C, 0.0) {}
  double* mine() { return part_.data() + static_cast<size_t>(thread_id()) * C_; }
  void reduce(float* out) const {
    for (int64_t c = 0; c < C_; ++c) {
      double s = 0.0;
      for (int t = 0; t < T_; ++t) s += part_[static_cast<size_t>(t) * C_ + c];
      out[c] = static_cast<float>(s);
    }
  }

 private:
  int64_t C_;
  int T_;
  std::vector<double> part_;
};

inline float gelu(float z) { return z * normal_cdf(z, gauss(z)); }

inline float gelu_grad(float z) {
  const float e = gauss(z);
  return normal_cdf(z, e) + z * (kInvSqrt2Pi * e);
}

}  // namespace

// ------------------------------------------------------------------ split heads (+ bias)
// h [B, N, 3 * H * D] -> q, k, v [B, H, N, D]; q = (h_q + b_q) * q_scale.
std::vector<paddle::Tensor> SplitHeadsForward(const paddle::Tensor& h, const paddle::Tensor& bias,
                                              int64_t num_heads, float q_scale) {
  check_f32(h, "qkv");
  const auto s = h.shape();
  const int64_t B = s[0], N = s[1], C3 = s[2], C = C3 / 3, H = num_heads, D = C / H;
  auto q = empty({B, H, N, D}, h), k = empty({B, H, N, D}, h), v = empty({B, H, N, D}, h);
  const float* src = h.data<float>();
  const float* b = bias.data<float>();
  float* outs[3] = {q.data<float>(), k.data<float>(), v.data<float>()};
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t bb = bn / N, n = bn % N;
    for (int64_t t = 0; t < 3; ++t) {
      const float sc = t == 0 ? q_scale : 1.0f;
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* in = src + bn * C3 + t * C + hh * D;
        const float* bi = b + t * C + hh * D;
        float* o = outs[t] + ((bb * H + hh) * N + n) * D;
        if (sc == 1.0f) {
          for (int64_t d = 0; d < D; ++d) o[d] = in[d] + bi[d];
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = (in[d] + bi[d]) * sc;
        }
      }
    }
  }
  return {q, k, v};
}

std::vector<paddle::Tensor> SplitHeadsBackward(const paddle::Tensor& h, const paddle::Tensor& bias,
                                               const paddle::Tensor& dq, const paddle::Tensor& dk,
                                               const paddle::Tensor& dv, int64_t num_heads,
                                               float q_scale) {
  const auto s = h.shape();
  const int64_t B = s[0], N = s[1], C3 = s[2], C = C3 / 3, H = num_heads, D = C / H;
  auto dh = empty({B, N, C3}, h);
  auto db = empty({C3}, h);
  float* out = dh.data<float>();
  const float* ins[3] = {dq.data<float>(), dk.data<float>(), dv.data<float>()};
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t bb = bn / N, n = bn % N;
    for (int64_t t = 0; t < 3; ++t) {
      const float sc = t == 0 ? q_scale : 1.0f;
      for (int64_t hh = 0; hh < H; ++hh) {
        const float* g = ins[t] + ((bb * H + hh) * N + n) * D;
        float* o = out + bn * C3 + t * C + hh * D;
        if (sc == 1.0f) {
          for (int64_t d = 0; d < D; ++d) o[d] = g[d];
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = g[d] * sc;
        }
      }
    }
  }
  column_sums(out, B * N, C3, db.data<float>());
  return {dh, db};
}

// ------------------------------------------------------------------------- bias add
// out = h + bias over the last axis (a Linear's bias); backward: dh = dout, dbias = column
// sums of dout (double accumulation), on all threads (Paddle's add backward reduces the bias
// gradient on one).
std::vector<paddle::Tensor> BiasAddForward(const paddle::Tensor& h, const paddle::Tensor& bias) {
  check_f32(h, "h");
  check_f32(bias, "bias");
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  PD_CHECK(bias.numel() == C, "bias_add: bias size mismatch");
  auto out = empty(h.shape(), h);
  const float* src = h.data<float>();
  const float* b = bias.data<float>();
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * C;
    float* o = dst + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = in[c] + b[c];
  }
  return {out};
}

std::vector<paddle::Tensor> BiasAddBackward(const paddle::Tensor& h, const paddle::Tensor& bias,
                                            const paddle::Tensor& dout) {
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  auto dh = empty(h.shape(), h);
  auto db = empty(bias.shape(), bias);
  const float* g = dout.data<float>();
  float* d = dh.data<float>();
  const int64_t n = h.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) d[i] = g[i];
  column_sums(g, rows, C, db.data<float>());
  return {dh, db};
}

// ------------------------------------------------------------------ split heads (one)
// [B, N, H * D] -> [B, H, N, D] (reshape + transpose): the head split of one tensor, and the
// backward of the head merge
void split_merged_heads(const float* src, int64_t B, int64_t N, int64_t H, int64_t D, float* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t bb = bn / N, n = bn % N;
    for (int64_t hh = 0; hh < H; ++hh) {
      const float* in = src + bn * H * D + hh * D;
      float* o = dst + ((bb * H + hh) * N + n) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = in[d];
    }
  }
}

std::vector<paddle::Tensor> HeadsForward(const paddle::Tensor& x, int heads) {
  check_f32(x, "x");
  const auto s = x.shape();
  PD_CHECK(s.size() == 3 && heads > 0 && s[2] % heads == 0, "heads: expected [B, N, H * D]");
  const int64_t B = s[0], N = s[1], H = heads, D = s[2] / heads;
  auto out = empty({B, H, N, D}, x);
  split_merged_heads(x.data<float>(), B, N, H, D, out.data<float>());
  return {out};
}

std::vector<paddle::Tensor> MergeHeadsForward(const paddle::Tensor& x);

std::vector<paddle::Tensor> HeadsBackward(const paddle::Tensor& x, const paddle::Tensor& dout,
                                          int heads) {
  return MergeHeadsForward(dout);  // [B, H, N, D] -> [B, N, H * D], the shape of x
}

// ------------------------------------------------------------------------ merge heads
// x [B, H, N, D] -> [B, N, H * D]
std::vector<paddle::Tensor> MergeHeadsForward(const paddle::Tensor& x) {
  check_f32(x, "x");
  const auto s = x.shape();
  const int64_t B = s[0], H = s[1], N = s[2], D = s[3];
  auto out = empty({B, N, H * D}, x);
  const float* src = x.data<float>();
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t bn = 0; bn < B * N; ++bn) {
    const int64_t bb = bn / N, n = bn % N;
    for (int64_t hh = 0; hh < H; ++hh) {
      const float* in = src + ((bb * H + hh) * N + n) * D;
      float* o = dst + bn * H * D + hh * D;
      for (int64_t d = 0; d < D; ++d) o[d] = in[d];
    }
  }
  return {out};
}

std::vector<paddle::Tensor> MergeHeadsBackward(const paddle::Tensor& x, const paddle::Tensor& dout) {
  const auto s = x.shape();
  const int64_t B = s[0], H = s[1], N = s[2], D = s[3];
  auto dx = empty({B, H, N, D}, x);
  split_merged_heads(dout.data<float>(), B, N, H, D, dx.data<float>());
  return {dx};
}

// -------------------------------------------------------------------- scaled softmax
// y = softmax(x * scale [+ bias]) over the last axis; x [B, H, R, L], bias [H, R, L].
namespace {
inline void softmax_row(const float* x, const float* bias, float scale, int64_t L, float* y) {
  float m = -INFINITY;
  if (bias) {
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < L; ++i) {
      const float t = x[i] * scale + bias[i];
      y[i] = t;
      m = std::max(m, t);
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < L; ++i) {
      const float t = x[i] * scale;
      y[i] = t;
      m = std::max(m, t);
    }
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < L; ++i) {
    const float e = exp_nonpositive(y[i] - m);
    y[i] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) y[i] = y[i] * inv;
}

inline void softmax_grad_row(const float* y, const float* dy, float scale, int64_t L, float* g,
                             float* dx) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < L; ++i) dot += dy[i] * y[i];
  if (g) {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      const float gi = y[i] * (dy[i] - dot);
      g[i] = gi;
      dx[i] = gi * scale;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) dx[i] = y[i] * (dy[i] - dot) * scale;
  }
}
}  // namespace

namespace {
// Row r of x (rows of length L) gets bias row r % (rows of bias), when there is a bias.
paddle::Tensor softmax_rows(const paddle::Tensor& x, const paddle::Tensor* bias, float scale) {
  check_f32(x, "x");
  if (bias) check_f32(*bias, "bias");
  auto y = empty(x.shape(), x);
  const int64_t L = x.shape().back(), rows = x.numel() / L;
  const int64_t bias_rows = bias ? bias->numel() / L : 1;
  const float* src = x.data<float>();
  const float* bp = bias ? bias->data<float>() : nullptr;
  float* dst = y.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    softmax_row(src + r * L, bp ? bp + (r % bias_rows) * L : nullptr, scale, L, dst + r * L);
  return y;
}
}  // namespace

std::vector<paddle::Tensor> ScaledSoftmaxForward(const paddle::Tensor& x, float scale) {
  return {softmax_rows(x, nullptr, scale)};
}

std::vector<paddle::Tensor> ScaledSoftmaxBackward(const paddle::Tensor& y, const paddle::Tensor& dy,
                                                  float scale) {
  auto dx = empty(y.shape(), y);
  const int64_t L = y.shape().back(), rows = y.numel() / L;
  const float* yp = y.data<float>();
  const float* dyp = dy.data<float>();
  float* out = dx.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    softmax_grad_row(yp + r * L, dyp + r * L, scale, L, nullptr, out + r * L);
  return {dx};
}

// bias [H, R, L] for x [B, H, R, L]
std::vector<paddle::Tensor> ScaledSoftmaxBiasForward(const paddle::Tensor& x,
                                                     const paddle::Tensor& bias, float scale) {
  return {softmax_rows(x, &bias, scale)};
}

std::vector<paddle::Tensor> ScaledSoftmaxBiasBackward(const paddle::Tensor& y,
                                                      const paddle::Tensor& bias,
                                                      const paddle::Tensor& dy, float scale) {
  auto dx = empty(y.shape(), y);
  auto dbias = empty(bias.shape(), bias);
  const auto s = y.shape();
  const int64_t L = s[3], R = s[2], HR = s[1] * R, B = s[0];
  const float* yp = y.data<float>();
  const float* dyp = dy.data<float>();
  float* out = dx.data<float>();
  float* db = dbias.data<float>();
#pragma omp parallel
  {
    std::vector<float> g(L);
    std::vector<double> acc(L);
#pragma omp for schedule(static)
    for (int64_t hr = 0; hr < HR; ++hr) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = b * HR + hr;
        softmax_grad_row(yp + r * L, dyp + r * L, scale, L, g.data(), out + r * L);
        for (int64_t i = 0; i < L; ++i) acc[i] += g[i];
      }
      for (int64_t i = 0; i < L; ++i) db[hr * L + i] = static_cast<float>(acc[i]);
    }
  }
  return {dx, dbias};
}

// ------------------------------------------------------------------ attention core
// out [B, N, H*D] = merge_heads(softmax(q k^T * scale) v) for q, k, v [B, H, N, D]; P (the
// softmax, [B, H, N, N]) is kept for the backward pass. The same operations as the reference
// (two matmuls around the scaled softmax above, then the head merge), but each (batch, head)
// pair's products are one single-threaded MKL sgemm on one OpenMP thread, the softmax runs on
// the scores while they are in cache, and the second product writes straight into the merged
// layout.
std::vector<paddle::Tensor> GemmAvailable(const paddle::Tensor& x) {
  auto out = paddle::empty({1}, paddle::DataType::FLOAT32, x.place());
  out.data<float>()[0] = (mkl().sgemm && mkl().set_threads_local) ? 1.0f : 0.0f;
  return {out};
}

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                             const paddle::Tensor& v, float scale) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  const Mkl& m = mkl();
  PD_CHECK(m.sgemm && m.set_threads_local, "attention: MKL (libmklml_intel.so) not found");
  const auto s = q.shape();
  const int B = s[0], H = s[1], N = s[2], D = s[3];
  auto out = empty({B, N, static_cast<int64_t>(H) * D}, q);
  auto prob = empty({B, H, N, N}, q);
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  float* op = out.data<float>();
  float* pp = prob.data<float>();
#pragma omp parallel
  {
    MklSequential sequential;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < static_cast<int64_t>(B) * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t off = bh * N * D;
      float* p = pp + bh * N * N;
      m.sgemm(kRowMajor, kNoTrans, kTrans, N, N, D, 1.0f, qp + off, D, kp + off, D, 0.0f, p, N);
      for (int64_t r = 0; r < N; ++r) softmax_row(p + r * N, nullptr, scale, N, p + r * N);
      m.sgemm(kRowMajor, kNoTrans, kNoTrans, N, D, N, 1.0f, p, N, vp + off, D, 0.0f,
              op + b * N * H * D + h * D, H * D);
    }
  }
  return {out, prob};
}

std::vector<paddle::Tensor> AttentionBackward(const paddle::Tensor& q, const paddle::Tensor& k,
                                              const paddle::Tensor& v, const paddle::Tensor& prob,
                                              const paddle::Tensor& dout, float scale) {
  const Mkl& m = mkl();
  const auto s = q.shape();
  const int B = s[0], H = s[1], N = s[2], D = s[3];
  auto dq = empty(s, q), dk = empty(s, q), dv = empty(s, q);
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  const float* pp = prob.data<float>();
  const float* gp = dout.data<float>();
  float* dqp = dq.data<float>();
  float* dkp = dk.data<float>();
  float* dvp = dv.data<float>();
#pragma omp parallel
  {
    MklSequential sequential;
    std::vector<float> ds(static_cast<size_t>(N) * N);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < static_cast<int64_t>(B) * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t off = bh * N * D;
      const float* p = pp + bh * N * N;
      const float* g = gp + b * N * H * D + h * D;  // this head's columns of the merged grad
      // out = P v:  dV = P^T dO,  dP = dO v^T
      m.sgemm(kRowMajor, kTrans, kNoTrans, N, D, N, 1.0f, p, N, g, H * D, 0.0f, dvp + off, D);
      m.sgemm(kRowMajor, kNoTrans, kTrans, N, N, D, 1.0f, g, H * D, vp + off, D, 0.0f,
              ds.data(), N);
      // scores: dS = P * (dP - <dP, P>) * scale, row by row (the scaled softmax's backward)
      for (int64_t r = 0; r < N; ++r)
        softmax_grad_row(p + r * N, ds.data() + r * N, scale, N, nullptr, ds.data() + r * N);
      // S = q k^T:  dq = dS k,  dk = dS^T q
      m.sgemm(kRowMajor, kNoTrans, kNoTrans, N, D, N, 1.0f, ds.data(), N, kp + off, D, 0.0f,
              dqp + off, D);
      m.sgemm(kRowMajor, kTrans, kNoTrans, N, D, N, 1.0f, ds.data(), N, qp + off, D, 0.0f,
              dkp + off, D);
    }
  }
  return {dq, dk, dv};
}

PD_BUILD_OP(cae_gemm_available).Inputs({"X"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(GemmAvailable));

PD_BUILD_OP(cae_attention)
    .Inputs({"Q", "K", "V"})
    .Outputs({"Out", "Prob"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(AttentionForward));
PD_BUILD_GRAD_OP(cae_attention)
    .Inputs({"Q", "K", "V", "Prob", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(AttentionBackward));

// ------------------------------------------------------------------------- bias + GELU
std::vector<paddle::Tensor> BiasGeluForward(const paddle::Tensor& h, const paddle::Tensor& bias) {
  check_f32(h, "h");
  auto out = empty(h.shape(), h);
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  const float* src = h.data<float>();
  const float* b = bias.data<float>();
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * C;
    float* o = dst + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = gelu(in[c] + b[c]);
  }
  return {out};
}

std::vector<paddle::Tensor> BiasGeluBackward(const paddle::Tensor& h, const paddle::Tensor& bias,
                                             const paddle::Tensor& dout) {
  auto dh = empty(h.shape(), h);
  auto db = empty(bias.shape(), bias);
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  const float* src = h.data<float>();
  const float* b = bias.data<float>();
  const float* g = dout.data<float>();
  float* dst = dh.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * C;
    const float* gr = g + r * C;
    float* o = dst + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = gr[c] * gelu_grad(in[c] + b[c]);
  }
  column_sums(dst, rows, C, db.data<float>());
  return {dh, db};
}

// ------------------------------------------------------------- residual + (h + bias)
namespace {
// out = res + (h + bias), or res + gamma * (h + bias) with a layer-scale gamma; with a
// per-sample 0/1 `mask` (drop path, see below) the branch is y / keep * mask[sample] first.
inline float drop_scale(float y, float keep, float inv_keep, bool true_div) {
  return true_div ? y / keep : y * inv_keep;
}

struct DropPath {
  const paddle::Tensor* mask = nullptr;
  float keep = 1.0f, inv_keep = 1.0f;
  bool true_div = true;
};

paddle::Tensor residual_forward(const paddle::Tensor& res, const paddle::Tensor& h,
                                const paddle::Tensor& bias, const paddle::Tensor* gamma,
                                const DropPath& drop = DropPath()) {
  check_f32(h, "h");
  auto out = empty(h.shape(), h);
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  const int64_t per = drop.mask ? rows / drop.mask->numel() : rows;
  const float* x = res.data<float>();
  const float* hp = h.data<float>();
  const float* b = bias.data<float>();
  const float* gm = gamma ? gamma->data<float>() : nullptr;
  const float* mk = drop.mask ? drop.mask->data<float>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i0 = r * C;
    const float m = mk ? mk[r / per] : 1.0f;
    float* o = out.data<float>() + i0;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float y = hp[i0 + c] + b[c];
      if (gm) y = gm[c] * y;
      if (mk) y = drop_scale(y, drop.keep, drop.inv_keep, drop.true_div) * m;
      o[c] = x[i0 + c] + y;
    }
  }
  return out;
}

// dres = dout; the branch's gradient gs = dout (drop path: (dout * mask) / keep); dh = gs
// [* gamma]; dbias = column sums of dh; dgamma = column sums of gs * (h + bias) (only with
// gamma), in one pass with per-thread double partials.
std::vector<paddle::Tensor> residual_backward(const paddle::Tensor& h, const paddle::Tensor& bias,
                                              const paddle::Tensor* gamma,
                                              const paddle::Tensor& dout,
                                              const DropPath& drop = DropPath()) {
  auto dres = empty(h.shape(), h), dh = empty(h.shape(), h);
  auto db = empty(bias.shape(), bias);
  const int64_t C = h.shape().back(), rows = h.numel() / C;
  const int64_t per = drop.mask ? rows / drop.mask->numel() : rows;
  const float* g = dout.data<float>();
  const float* hp = h.data<float>();
  const float* b = bias.data<float>();
  const float* gm = gamma ? gamma->data<float>() : nullptr;
  const float* mk = drop.mask ? drop.mask->data<float>() : nullptr;
  float* a = dres.data<float>();
  float* d = dh.data<float>();
  ColumnPartials sum_b(C), sum_g(gm ? C : 0);
#pragma omp parallel
  {
    double* pb = sum_b.mine();
    double* pg = sum_g.mine();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i0 = r * C;
      const float m = mk ? mk[r / per] : 1.0f;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = i0 + c;
        const float gs = mk ? drop_scale(g[i] * m, drop.keep, drop.inv_keep, drop.true_div)
                            : g[i];
        a[i] = g[i];
        if (gm) {
          pg[c] += static_cast<double>(gs) * (hp[i] + b[c]);
          d[i] = gs * gm[c];
        } else {
          d[i] = gs;
        }
        pb[c] += d[i];
      }
    }
  }
  sum_b.reduce(db.data<float>());
  if (!gm) return {dres, dh, db};
  auto dgamma = empty(gamma->shape(), *gamma);
  sum_g.reduce(dgamma.data<float>());
  return {dres, dh, db, dgamma};
}
}  // namespace

std::vector<paddle::Tensor> ResidualBiasForward(const paddle::Tensor& res, const paddle::Tensor& h,
                                                const paddle::Tensor& bias) {
  return {residual_forward(res, h, bias, nullptr)};
}

std::vector<paddle::Tensor> ResidualBiasBackward(const paddle::Tensor& res, const paddle::Tensor& h,
                                                 const paddle::Tensor& bias,
                                                 const paddle::Tensor& dout) {
  return residual_backward(h, bias, nullptr, dout);
}

std::vector<paddle::Tensor> ResidualScaleBiasForward(const paddle::Tensor& res,
                                                     const paddle::Tensor& h,
                                                     const paddle::Tensor& bias,
                                                     const paddle::Tensor& gamma) {
  return {residual_forward(res, h, bias, &gamma)};
}

std::vector<paddle::Tensor> ResidualScaleBiasBackward(const paddle::Tensor& res,
                                                      const paddle::Tensor& h,
                                                      const paddle::Tensor& bias,
                                                      const paddle::Tensor& gamma,
                                                      const paddle::Tensor& dout) {
  return residual_backward(h, bias, &gamma, dout);
}

// ------------------------------------------------------- bias + layer scale + drop path
// out = res + drop_path(gamma * (h + bias)), drop path as the reference DropPath computes it:
// y / keep * mask[sample] with the sample's 0/1 mask drawn by the caller. `true_div`: this
// Paddle divides a tensor by a Python float (3.x); otherwise it multiplies by the float32
// reciprocal `inv_keep` (2.6). Same float32 operations in the same order as the reference.
namespace {
DropPath drop_of(const paddle::Tensor& mask, float keep, float inv_keep, bool true_div) {
  check_f32(mask, "mask");
  DropPath d;
  d.mask = &mask;
  d.keep = keep;
  d.inv_keep = inv_keep;
  d.true_div = true_div;
  return d;
}
}  // namespace

std::vector<paddle::Tensor> ResidualDropForward(const paddle::Tensor& res, const paddle::Tensor& h,
                                                const paddle::Tensor& bias,
                                                const paddle::Tensor& mask, float keep,
                                                float inv_keep, bool true_div) {
  return {residual_forward(res, h, bias, nullptr, drop_of(mask, keep, inv_keep, true_div))};
}

std::vector<paddle::Tensor> ResidualDropBackward(const paddle::Tensor& res, const paddle::Tensor& h,
                                                 const paddle::Tensor& bias,
                                                 const paddle::Tensor& mask,
                                                 const paddle::Tensor& dout, float keep,
                                                 float inv_keep, bool true_div) {
  return residual_backward(h, bias, nullptr, dout, drop_of(mask, keep, inv_keep, true_div));
}

std::vector<paddle::Tensor> ResidualScaleDropForward(
    const paddle::Tensor& res, const paddle::Tensor& h, const paddle::Tensor& bias,
    const paddle::Tensor& gamma, const paddle::Tensor& mask, float keep, float inv_keep,
    bool true_div) {
  return {residual_forward(res, h, bias, &gamma, drop_of(mask, keep, inv_keep, true_div))};
}

std::vector<paddle::Tensor> ResidualScaleDropBackward(
    const paddle::Tensor& res, const paddle::Tensor& h, const paddle::Tensor& bias,
    const paddle::Tensor& gamma, const paddle::Tensor& mask, const paddle::Tensor& dout,
    float keep, float inv_keep, bool true_div) {
  return residual_backward(h, bias, &gamma, dout, drop_of(mask, keep, inv_keep, true_div));
}

PD_BUILD_OP(cae_residual_drop)
    .Inputs({"Res", "H", "Bias", "Mask"})
    .Outputs({"Out"})
    .Attrs({"keep: float", "inv_keep: float", "true_div: bool"})
    .SetKernelFn(PD_KERNEL(ResidualDropForward));
PD_BUILD_GRAD_OP(cae_residual_drop)
    .Inputs({"Res", "H", "Bias", "Mask", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Res"), paddle::Grad("H"), paddle::Grad("Bias")})
    .Attrs({"keep: float", "inv_keep: float", "true_div: bool"})
    .SetKernelFn(PD_KERNEL(ResidualDropBackward));

PD_BUILD_OP(cae_residual_scale_drop)
    .Inputs({"Res", "H", "Bias", "Gamma", "Mask"})
    .Outputs({"Out"})
    .Attrs({"keep: float", "inv_keep: float", "true_div: bool"})
    .SetKernelFn(PD_KERNEL(ResidualScaleDropForward));
PD_BUILD_GRAD_OP(cae_residual_scale_drop)
    .Inputs({"Res", "H", "Bias", "Gamma", "Mask", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Res"), paddle::Grad("H"), paddle::Grad("Bias"), paddle::Grad("Gamma")})
    .Attrs({"keep: float", "inv_keep: float", "true_div: bool"})
    .SetKernelFn(PD_KERNEL(ResidualScaleDropBackward));

// ------------------------------------------------------------------------- layer norm
std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                             const paddle::Tensor& b, float eps) {
  check_f32(x, "x");
  const int64_t C = x.shape().back(), rows = x.numel() / C;
  auto y = empty(x.shape(), x);
  auto mean = empty({rows}, x), rstd = empty({rows}, x);
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
  float* mp = mean.data<float>();
  float* rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * C;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += row[c];
    const float m = static_cast<float>(s / C);
    double v = 0.0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < C; ++c) {
      const float d = row[c] - m;
      v += static_cast<double>(d) * d;
    }
    const float var = static_cast<float>(v / C);
    const float rs = 1.0f / std::sqrt(var + eps);
    mp[r] = m;
    rp[r] = rs;
    float* out = yp + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = (row[c] - m) * rs * wp[c] + bp[c];
  }
  return {y, mean, rstd};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& b, const paddle::Tensor& mean,
                                              const paddle::Tensor& rstd, const paddle::Tensor& dy,
                                              float eps) {
  const int64_t C = x.shape().back(), rows = x.numel() / C;
  auto dx = empty(x.shape(), x);
  auto dw = empty(w.shape(), w), db = empty(b.shape(), b);
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* mp = mean.data<float>();
  const float* rp = rstd.data<float>();
  const float* g = dy.data<float>();
  float* out = dx.data<float>();
  ColumnPartials sum_w(C), sum_b(C);
#pragma omp parallel
  {
    double* pw = sum_w.mine();
    double* pb = sum_b.mine();
    std::vector<float> xhat(C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = xp + r * C;
      const float* gr = g + r * C;
      const float m = mp[r], rs = rp[r];
      double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (row[c] - m) * rs;
        xhat[c] = xh;
        const float gw = gr[c] * wp[c];
        s1 += gw;
        s2 += static_cast<double>(gw) * xh;
        pw[c] += static_cast<double>(gr[c]) * xh;
        pb[c] += gr[c];
      }
      const float a = static_cast<float>(s1 / C), cc = static_cast<float>(s2 / C);
      float* o = out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = rs * (gr[c] * wp[c] - a - xhat[c] * cc);
    }
  }
  sum_w.reduce(dw.data<float>());
  sum_b.reduce(db.data<float>());
  return {dx, dw, db};
}

// ----------------------------------------------------------------------- registration
PD_BUILD_OP(cae_split_heads)
    .Inputs({"QKV", "Bias"})
    .Outputs({"Q", "K", "V"})
    .Attrs({"num_heads: int64_t", "q_scale: float"})
    .SetKernelFn(PD_KERNEL(SplitHeadsForward));
PD_BUILD_GRAD_OP(cae_split_heads)
    .Inputs({"QKV", "Bias", paddle::Grad("Q"), paddle::Grad("K"), paddle::Grad("V")})
    .Outputs({paddle::Grad("QKV"), paddle::Grad("Bias")})
    .Attrs({"num_heads: int64_t", "q_scale: float"})
    .SetKernelFn(PD_KERNEL(SplitHeadsBackward));

PD_BUILD_OP(cae_bias_add).Inputs({"H", "Bias"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(BiasAddForward));
PD_BUILD_GRAD_OP(cae_bias_add)
    .Inputs({"H", "Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("H"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(BiasAddBackward));

PD_BUILD_OP(cae_heads)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"heads: int"})
    .SetKernelFn(PD_KERNEL(HeadsForward));
PD_BUILD_GRAD_OP(cae_heads)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"heads: int"})
    .SetKernelFn(PD_KERNEL(HeadsBackward));

PD_BUILD_OP(cae_merge_heads).Inputs({"X"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(MergeHeadsForward));
PD_BUILD_GRAD_OP(cae_merge_heads)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(MergeHeadsBackward));

PD_BUILD_OP(cae_scaled_softmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(ScaledSoftmaxForward));
PD_BUILD_GRAD_OP(cae_scaled_softmax)
    .Inputs({"Out", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(ScaledSoftmaxBackward));

PD_BUILD_OP(cae_scaled_softmax_bias)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(ScaledSoftmaxBiasForward));
PD_BUILD_GRAD_OP(cae_scaled_softmax_bias)
    .Inputs({"Out", "Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(ScaledSoftmaxBiasBackward));

PD_BUILD_OP(cae_bias_gelu).Inputs({"H", "Bias"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(BiasGeluForward));
PD_BUILD_GRAD_OP(cae_bias_gelu)
    .Inputs({"H", "Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("H"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(BiasGeluBackward));

PD_BUILD_OP(cae_residual_bias)
    .Inputs({"Res", "H", "Bias"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ResidualBiasForward));
PD_BUILD_GRAD_OP(cae_residual_bias)
    .Inputs({"Res", "H", "Bias", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Res"), paddle::Grad("H"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(ResidualBiasBackward));

PD_BUILD_OP(cae_residual_scale_bias)
    .Inputs({"Res", "H", "Bias", "Gamma"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(ResidualScaleBiasForward));
PD_BUILD_GRAD_OP(cae_residual_scale_bias)
    .Inputs({"Res", "H", "Bias", "Gamma", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Res"), paddle::Grad("H"), paddle::Grad("Bias"), paddle::Grad("Gamma")})
    .SetKernelFn(PD_KERNEL(ResidualScaleBiasBackward));

PD_BUILD_OP(cae_layer_norm)
    .Inputs({"X", "W", "B"})
    .Outputs({"Y", "Mean", "Rstd"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward));
PD_BUILD_GRAD_OP(cae_layer_norm)
    .Inputs({"X", "W", "B", "Mean", "Rstd", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));
