// Optimizer-step kernels (float32, in place, no backward): AdamW's update, the loss scaler's
// non-finite check, gradient clipping's sums of squares and scaling, and the EMA update.
// Python wrappers and the Paddle operators each one replaces ("Reference"):
// paddle_cae/fast/kernels/optimizer.py.
#include "common.h"

// ----------------------------------------------------------------------------- AdamW
// One in-place AdamW update with the plain path's arithmetic (paddle_cae/optim/adamw.py),
// float32 throughout, every scalar rounded to float32 as Paddle's scalar ops do:
//   p = p * decay;  m = m + w1 * (g - m);  v = v * b2 + (g * g) * w2;
//   p = p + (m / (sqrt(v) / sqrt_bc2 + eps)) * step
// Moments come out bit-identical; the parameters can differ in the last bit where Paddle's
// CPU sqrt (up to 3 ulp off) differs from the correctly rounded one used here (and by PyTorch).
// The parameter and moments are updated where they are (the op is only called under no_grad;
// Paddle refuses an inplace map on leaf parameters even then); the output is a 1-element
// placeholder.
std::vector<paddle::Tensor> AdamWUpdate(const paddle::Tensor& p, const paddle::Tensor& g,
                                        const paddle::Tensor& m, const paddle::Tensor& v,
                 float decay, float w1, float b2, float w2, float sqrt_bc2, float eps,
                 float step, bool apply_decay) {
  check_f32(p, "param");
  check_f32(g, "grad");
  const int64_t n = p.numel();
  PD_CHECK(g.numel() == n && m.numel() == n && v.numel() == n, "adamw: size mismatch");
  float* pp = const_cast<float*>(p.data<float>());
  float* mp = const_cast<float*>(m.data<float>());
  float* vp = const_cast<float*>(v.data<float>());
  const float* gp = g.data<float>();
  // vectorized (built with -fno-math-errno, so sqrt is the vector instruction): the same
  // correctly rounded operations as one element at a time
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float pi = apply_decay ? pp[i] * decay : pp[i];
    const float gi = gp[i];
    const float mi = mp[i] + w1 * (gi - mp[i]);
    const float vi = vp[i] * b2 + (gi * gi) * w2;
    const float denom = std::sqrt(vi) / sqrt_bc2 + eps;
    pp[i] = pi + (mi / denom) * step;
    mp[i] = mi;
    vp[i] = vi;
  }
  return {paddle::empty({1}, paddle::DataType::FLOAT32, p.place())};
}

PD_BUILD_OP(cae_adamw_update)
    .Inputs({"Param", "Grad", "Moment1", "Moment2"})
    .Outputs({"Done"})
    .Attrs({"decay: float", "w1: float", "b2: float", "w2: float", "sqrt_bc2: float",
            "eps: float", "step: float", "apply_decay: bool"})
    .SetKernelFn(PD_KERNEL(AdamWUpdate));
// ------------------------------------------------- finiteness of a list of gradients
// out[0] = 1 when any element of any tensor is inf or NaN, else 0 (x - x is 0 exactly for
// every finite x and NaN otherwise); one multi-threaded pass per tensor, no per-tensor ops.
std::vector<paddle::Tensor> NonFinite(const std::vector<paddle::Tensor>& xs) {
  PD_CHECK(!xs.empty(), "non_finite: no tensors");
  auto out = paddle::empty({1}, paddle::DataType::FLOAT32, xs[0].place());
  int bad = 0;
  for (const auto& x : xs) {
    check_f32(x, "x");
    const float* p = x.data<float>();
    const int64_t n = x.numel();
    int found = 0;
#pragma omp parallel for simd reduction(| : found) schedule(static)
    for (int64_t i = 0; i < n; ++i) found |= (p[i] - p[i]) != 0.0f;
    bad |= found;
    if (bad) break;
  }
  out.data<float>()[0] = bad ? 1.0f : 0.0f;
  return {out};
}

// out[t] = sum of x_t * x_t over tensor t (each square rounded to float32 as Paddle's
// g * g; the sum accumulated in double, then rounded): the squared gradient norms.
std::vector<paddle::Tensor> SumsOfSquares(const std::vector<paddle::Tensor>& xs) {
  PD_CHECK(!xs.empty(), "sums_of_squares: no tensors");
  auto out = paddle::empty({static_cast<int64_t>(xs.size())}, paddle::DataType::FLOAT32,
                           xs[0].place());
  float* o = out.data<float>();
  for (size_t t = 0; t < xs.size(); ++t) {
    check_f32(xs[t], "x");
    const float* p = xs[t].data<float>();
    const int64_t n = xs[t].numel();
    double acc = 0.0;
#pragma omp parallel for simd reduction(+ : acc) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float sq = p[i] * p[i];
      acc += sq;
    }
    o[t] = static_cast<float>(acc);
  }
  return {out};
}

// every x_t *= coef[0], in place (float32 products, as Paddle's multiply_ by a [1] tensor):
// gradient clipping in one call instead of one operator per tensor
std::vector<paddle::Tensor> ScaleAll(const std::vector<paddle::Tensor>& xs,
                                     const paddle::Tensor& coef) {
  PD_CHECK(!xs.empty(), "scale_all: no tensors");
  check_f32(coef, "coef");
  const float c = coef.data<float>()[0];
  for (const auto& x : xs) {
    check_f32(x, "x");
    float* p = const_cast<float*>(x.data<float>());
    const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] * c;
  }
  return {paddle::empty({1}, paddle::DataType::FLOAT32, xs[0].place())};
}

PD_BUILD_OP(cae_scale_all)
    .Inputs({paddle::Vec("X"), "Coef"})
    .Outputs({"Done"})
    .SetKernelFn(PD_KERNEL(ScaleAll));

PD_BUILD_OP(cae_sums_of_squares)
    .Inputs({paddle::Vec("X")})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SumsOfSquares));

PD_BUILD_OP(cae_non_finite).Inputs({paddle::Vec("X")}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(NonFinite));

// ------------------------------------------------------------- EMA teacher (in place)
// ema = ema * keep + online * take, each product rounded to float32 (no fused multiply-add),
// as Paddle's `ema * keep + online * take`.
std::vector<paddle::Tensor> EmaUpdate(const paddle::Tensor& ema, const paddle::Tensor& online,
                                      float keep, float take) {
  check_f32(ema, "ema");
  check_f32(online, "online");
  const int64_t n = ema.numel();
  PD_CHECK(online.numel() == n, "ema_update: size mismatch");
  float* e = const_cast<float*>(ema.data<float>());
  const float* o = online.data<float>();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) e[i] = e[i] * keep + o[i] * take;
  return {paddle::empty({1}, paddle::DataType::FLOAT32, ema.place())};
}

PD_BUILD_OP(cae_ema_update)
    .Inputs({"Ema", "Online"})
    .Outputs({"Done"})
    .Attrs({"keep: float", "take: float"})
    .SetKernelFn(PD_KERNEL(EmaUpdate));
