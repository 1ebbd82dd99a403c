// Tokenizer kernels: the frozen DALL-E encoder's convolutions, pooling and argmax head
// (float32, no gradient, no backward). Python wrappers and the Paddle operators each one
// replaces ("Reference"): paddle_cae/fast/kernels/tokenizer.py.
#include "common.h"

// ------------------------------------------------- frozen convolutional tokenizer (no grad)
// out[n, c, ...] = x[n, c, ...] + bias[c]  (NCHW; the bias add of a convolution)
std::vector<paddle::Tensor> ChannelBias(const paddle::Tensor& x, const paddle::Tensor& bias) {
  check_f32(x, "x");
  check_f32(bias, "bias");
  PD_CHECK(x.shape().size() >= 2 && x.shape()[1] == bias.numel(), "channel_bias: shape mismatch");
  auto out = empty(x.shape(), x);
  const int64_t C = x.shape()[1], planes = x.shape()[0] * C, HW = x.numel() / planes;
  const float* xp = x.data<float>();
  const float* b = bias.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const float bc = b[p % C];
    const float* in = xp + p * HW;
    float* dst = o + p * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) dst[i] = in[i] + bc;
  }
  return {out};
}

// out = a + gain * b  (a residual block's output)
std::vector<paddle::Tensor> AddScaled(const paddle::Tensor& a, const paddle::Tensor& b, float gain) {
  check_f32(a, "a");
  check_f32(b, "b");
  PD_CHECK(a.numel() == b.numel(), "add_scaled: size mismatch");
  auto out = empty(a.shape(), a);
  const int64_t n = a.numel();
  const float* ap = a.data<float>();
  const float* bp = b.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) o[i] = ap[i] + gain * bp[i];
  return {out};
}

PD_BUILD_OP(cae_channel_bias).Inputs({"X", "Bias"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(ChannelBias));

PD_BUILD_OP(cae_add_scaled)
    .Inputs({"A", "B"})
    .Outputs({"Out"})
    .Attrs({"gain: float"})
    .SetKernelFn(PD_KERNEL(AddScaled));

// --------------------------------- frozen convolutional tokenizer: im2col tiles + MKL sgemm
// The DALL-E encoder's convolutions (stride 1, 'same' zero padding, odd k), its 2x2 max-pool
// and its ReLU + 1x1 head + argmax, on activations kept channel-major: [C, B, H, W]. Each
// OpenMP thread takes tiles of T output positions (the flattened b, y, x): it gathers the
// tile's im2col matrix [C*k*k, T] (rows in the weights' (c, ky, kx) order, so the
// [O, C, k, k] weights are used as they are; the ReLU that precedes the encoder's
// convolutions applied while gathering), multiplies it with one single-threaded MKL sgemm
// [O, C*k*k] x [C*k*k, T], and adds the bias (then the ReLU, or the block's residual) while
// the tile is in cache (Paddle's CPU convolution builds the im2col matrix of a whole image in
// memory and runs one product per image). Values: the same products and sums, in MKL's
// summation order (as the matmuls of the rest of the model).
namespace {
struct Planes {  // element (c, b, y, x) at p[c * sc + b * sb + y * W + x]
  const float* p;
  int64_t C, B, H, W, sc, sb;
};

Planes planes_of(const paddle::Tensor& x, bool nchw) {
  const auto s = x.shape();
  PD_CHECK(s.size() == 4, "tokenizer: expected a 4-D tensor");
  Planes v;
  v.p = x.data<float>();
  v.C = nchw ? s[1] : s[0];
  v.B = nchw ? s[0] : s[1];
  v.H = s[2];
  v.W = s[3];
  const int64_t hw = v.H * v.W;
  v.sc = nchw ? hw : v.B * hw;
  v.sb = nchw ? v.C * hw : hw;
  return v;
}

// col[(c * k + ky) * k + kx][j] = in(c, b, y + ky - pad, x + kx - pad) (0 outside the image;
// ReLU'd when `relu`) for the T output positions n0 + j = (b, y, x); rows are T long
void gather_tile(const Planes& in, int k, bool relu, int64_t n0, int64_t T, float* col) {
  const int64_t pad = (k - 1) / 2, H = in.H, W = in.W, HW = H * W;
  for (int64_t c = 0; c < in.C; ++c) {
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) {
        float* dst = col + ((c * k + ky) * k + kx) * T;
        const int64_t shift = kx - pad;
        int64_t j = 0, n = n0;
        while (j < T) {
          const int64_t b = n / HW, r = n - b * HW, y = r / W, x = r - y * W;
          const int64_t run = std::min(W - x, T - j);
          const int64_t ys = y + ky - pad;
          float* d = dst + j;
          if (ys < 0 || ys >= H) {
            std::fill(d, d + run, 0.0f);
          } else {
            // source column x + i + shift is inside [0, W) for i in [i0, i1)
            const int64_t i0 = std::min(run, std::max<int64_t>(0, -(x + shift)));
            const int64_t i1 = std::max(i0, std::min(run, W - (x + shift)));
            const float* s = in.p + c * in.sc + b * in.sb + ys * W + x + shift;
            std::fill(d, d + i0, 0.0f);
            if (relu) {
#pragma omp simd
              for (int64_t i = i0; i < i1; ++i) {
                const float v = s[i];
                d[i] = v > 0.0f ? v : 0.0f;
              }
            } else {
              std::memcpy(d + i0, s + i0, (i1 - i0) * sizeof(float));
            }
            std::fill(d + i1, d + run, 0.0f);
          }
          j += run;
          n += run;
        }
      }
    }
  }
}

// output positions per tile: the im2col tile within ~8 MiB (64..1024 positions; in the
// shared L3 cache), and a number of tiles that the threads share evenly
int64_t tile_size(int64_t K, int64_t N) {
  const int64_t want = std::max<int64_t>(64, std::min<int64_t>(1024, (int64_t{1} << 21) / K));
  const int64_t threads = num_threads();
  int64_t tiles = (N + want - 1) / want;
  tiles = (tiles + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (N + tiles - 1) / tiles);
}

enum TokenizerEpilogue { kConvBias = 0, kConvBiasRelu = 1, kConvResidual = 2 };
}  // namespace

// out [O, B, H, W] = conv(x) + bias, then: as is (epilogue 0), ReLU'd (1), or
// res + gain * (conv(x) + bias) (2). x is [B, C, H, W] when `nchw`, else [C, B, H, W];
// `relu_in`: the convolution reads ReLU(x).
std::vector<paddle::Tensor> TokenizerConv(const paddle::Tensor& x, const paddle::Tensor& w,
                                          const paddle::Tensor& bias, const paddle::Tensor& res,
                                          bool nchw, bool relu_in, int epilogue, float gain) {
  check_f32(x, "x");
  check_f32(w, "w");
  check_f32(bias, "bias");
  const Mkl& m = mkl();
  PD_CHECK(m.sgemm && m.set_threads_local, "tokenizer conv: MKL (libmklml_intel.so) not found");
  const Planes in = planes_of(x, nchw);
  const auto ws = w.shape();
  PD_CHECK(ws.size() == 4 && ws[1] == in.C && ws[2] == ws[3] && ws[2] % 2 == 1,
           "tokenizer conv: weights must be [O, C, k, k] with odd k and C = input channels");
  const int64_t O = ws[0], k = ws[2], K = in.C * k * k, N = in.B * in.H * in.W;
  PD_CHECK(bias.numel() == O, "tokenizer conv: bias size mismatch");
  auto out = empty({O, in.B, in.H, in.W}, x);
  const float* res_p = nullptr;
  if (epilogue == kConvResidual) {
    check_f32(res, "res");
    PD_CHECK(res.numel() == O * N, "tokenizer conv: residual size mismatch");
    res_p = res.data<float>();
  }
  const float* wp = w.data<float>();
  const float* bp = bias.data<float>();
  float* op = out.data<float>();
  // a 1x1 convolution of a channel-major input without ReLU multiplies the input as it is
  const bool direct = k == 1 && !relu_in && !nchw;
  const int64_t T = tile_size(K, N), tiles = (N + T - 1) / T;
#pragma omp parallel
  {
    MklSequential sequential;
    std::vector<float> col(direct ? 0 : K * T), acc(O * T);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * T, Tn = std::min(T, N - n0);
      const float* src = in.p + n0;
      int64_t ld = N;
      if (!direct) {
        gather_tile(in, static_cast<int>(k), relu_in, n0, Tn, col.data());
        src = col.data();
        ld = Tn;
      }
      m.sgemm(kRowMajor, kNoTrans, kNoTrans, O, Tn, K, 1.0f, wp, K, src, ld, 0.0f, acc.data(), Tn);
      for (int64_t o = 0; o < O; ++o) {
        const float* a = acc.data() + o * Tn;
        float* dst = op + o * N + n0;
        const float b = bp[o];
        if (epilogue == kConvBiasRelu) {
#pragma omp simd
          for (int64_t j = 0; j < Tn; ++j) {
            const float v = a[j] + b;
            dst[j] = v > 0.0f ? v : 0.0f;
          }
        } else if (epilogue == kConvResidual) {
          const float* r = res_p + o * N + n0;
#pragma omp simd
          for (int64_t j = 0; j < Tn; ++j) dst[j] = r[j] + gain * (a[j] + b);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < Tn; ++j) dst[j] = a[j] + b;
        }
      }
    }
  }
  return {out};
}

// token ids int64 [B, H * W]: argmax over o of (conv1x1(ReLU(x)) + bias)[o] for x
// [C, B, H, W] and weights [V, C, 1, 1] (the first index of the largest logit, as
// paddle.argmax)
std::vector<paddle::Tensor> TokenizerArgmax(const paddle::Tensor& x, const paddle::Tensor& w,
                                            const paddle::Tensor& bias) {
  check_f32(x, "x");
  check_f32(w, "w");
  check_f32(bias, "bias");
  const Mkl& m = mkl();
  PD_CHECK(m.sgemm && m.set_threads_local, "tokenizer head: MKL (libmklml_intel.so) not found");
  const Planes in = planes_of(x, false);
  const auto ws = w.shape();
  PD_CHECK(ws.size() == 4 && ws[1] == in.C && ws[2] == 1 && ws[3] == 1,
           "tokenizer head: weights must be [V, C, 1, 1]");
  const int64_t V = ws[0], K = in.C, N = in.B * in.H * in.W;
  PD_CHECK(bias.numel() == V, "tokenizer head: bias size mismatch");
  auto ids = paddle::empty({in.B, in.H * in.W}, paddle::DataType::INT64, x.place());
  const float* wp = w.data<float>();
  const float* bp = bias.data<float>();
  int64_t* idp = ids.data<int64_t>();
  const int64_t T = tile_size(K, N), tiles = (N + T - 1) / T;
#pragma omp parallel
  {
    MklSequential sequential;
    std::vector<float> col(K * T), acc(V * T), best(T);
    std::vector<int32_t> arg(T);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * T, Tn = std::min(T, N - n0);
      gather_tile(in, 1, true, n0, Tn, col.data());
      m.sgemm(kRowMajor, kNoTrans, kNoTrans, V, Tn, K, 1.0f, wp, K, col.data(), Tn, 0.0f,
              acc.data(), Tn);
      for (int64_t j = 0; j < Tn; ++j) {
        best[j] = acc[j] + bp[0];
        arg[j] = 0;
      }
      for (int64_t v = 1; v < V; ++v) {
        const float* a = acc.data() + v * Tn;
        const float b = bp[v];
        const int32_t vi = static_cast<int32_t>(v);
#pragma omp simd
        for (int64_t j = 0; j < Tn; ++j) {
          const float val = a[j] + b;
          const bool larger = val > best[j];
          best[j] = larger ? val : best[j];
          arg[j] = larger ? vi : arg[j];
        }
      }
      for (int64_t j = 0; j < Tn; ++j) idp[n0 + j] = arg[j];
    }
  }
  return {ids};
}

// 2x2 max-pool, stride 2 (odd sizes floored) of x [C, B, H, W]
std::vector<paddle::Tensor> TokenizerPool(const paddle::Tensor& x) {
  check_f32(x, "x");
  const Planes in = planes_of(x, false);
  const int64_t Ho = in.H / 2, Wo = in.W / 2, rows = in.C * in.B * Ho;
  auto out = empty({in.C, in.B, Ho, Wo}, x);
  float* op = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t plane = r / Ho, y = r - plane * Ho;
    const float* a = in.p + plane * in.H * in.W + 2 * y * in.W;
    const float* b = a + in.W;
    float* dst = op + r * Wo;
    for (int64_t x = 0; x < Wo; ++x) {
      dst[x] = std::max(std::max(a[2 * x], a[2 * x + 1]), std::max(b[2 * x], b[2 * x + 1]));
    }
  }
  return {out};
}

PD_BUILD_OP(cae_tokenizer_conv)
    .Inputs({"X", "W", "Bias", "Res"})
    .Outputs({"Out"})
    .Attrs({"nchw: bool", "relu_in: bool", "epilogue: int", "gain: float"})
    .SetKernelFn(PD_KERNEL(TokenizerConv));

PD_BUILD_OP(cae_tokenizer_argmax)
    .Inputs({"X", "W", "Bias"})
    .Outputs({"Ids"})
    .SetKernelFn(PD_KERNEL(TokenizerArgmax));

PD_BUILD_OP(cae_tokenizer_pool).Inputs({"X"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(TokenizerPool));
