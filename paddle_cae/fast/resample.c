/*
 * Crop + resize of 8-bit RGB images with the arithmetic of Pillow's convolution resampling
 * (Image.resize with BOX, BILINEAR, HAMMING, BICUBIC or LANCZOS on an 8-bit image), so that
 *
 *     pc_crop_resize(image, box, size, filter)  ==  image.crop(box).resize(size, filter)
 *
 * bit for bit, without the intermediate crop copy and with vectorised inner loops.
 *
 * What has to match Pillow exactly (and does, see tests/test_resample.py):
 *   - the filter weights: computed in double, per output pixel, over the input pixels whose
 *     rounded window [center - support, center + support) meets the crop, clipped to the
 *     crop, divided by their sum; then turned into 22-bit fixed point, rounded half away from
 *     zero by truncation of k * 2^22 +- 0.5;
 *   - two separable passes: horizontal first (only over the rows the vertical pass reads),
 *     its result rounded and clipped to 8 bits, then vertical; a pass is skipped (copy) when
 *     its size does not change;
 *   - each output value: (2^21 + sum of pixel * weight) >> 22 (arithmetic), clipped to 0..255.
 * The sums are exact 32-bit integer sums (Pillow's 22-bit weights leave room for them), so
 * they may be added in any order: the vector code sums several taps and channels per
 * instruction, and a mirrored source is read in ascending memory order with reversed weights.
 *
 * The input is the full decoded image (RGB with 3 bytes per pixel, or Pillow's RGBX storage
 * with 4), optionally mirrored left-right (the crop box is then a box of the mirrored image);
 * the output is planar uint8 [3][out_h][out_w] (channel first), optionally mirrored
 * left-right. A mirrored output is exact (a pass's columns are independent); a mirrored
 * source is not the same as mirroring the output (the window rounding is not symmetric),
 * hence both options.
 *
 * Plain C with SSE4.1 / AVX2 / AVX-512BW code paths chosen at compile time; no Python or
 * Paddle headers. Buffers are per thread and kept between calls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define PC_AVX512 1
#define PC_TAPS 4 /* taps per vector (4 int32 lanes per pixel) */
#elif defined(__AVX2__)
#include <immintrin.h>
#define PC_AVX2 1
#define PC_TAPS 2
#else
#define PC_TAPS 1
#endif

#define PC_ABI_VERSION 1
#define PC_BITS 22 /* fixed-point bits of the weights, as Pillow's 8-bit path */
#define PC_HALF (1 << (PC_BITS - 1))
#define PC_PI 3.14159265358979323846

enum { PC_BOX = 4, PC_BILINEAR = 2, PC_HAMMING = 5, PC_BICUBIC = 3, PC_LANCZOS = 1 };

/* ----------------------------------------------------------------------------- filters */
/* Each is the same double expression, evaluated in the same order, as Pillow's. */
static double w_box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

static double w_bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double w_hamming(double x) {
    if (x < 0.0) x = -x;
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x = x * PC_PI;
    /* single-precision constants widened to double, as in Pillow */
    return sin(x) / x * ((double)0.54f + (double)0.46f * cos(x));
}

static double w_bicubic(double x) { /* Keys' cubic convolution, a = -0.5 */
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * PC_PI;
    return sin(x) / x;
}

static double w_lanczos(double x) { /* 3-lobed */
    return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
}

typedef double (*weight_fn)(double);

static int filter_of(int filter, weight_fn *fn, double *support) {
    switch (filter) {
    case PC_BOX: *fn = w_box; *support = 0.5; return 0;
    case PC_BILINEAR: *fn = w_bilinear; *support = 1.0; return 0;
    case PC_HAMMING: *fn = w_hamming; *support = 1.0; return 0;
    case PC_BICUBIC: *fn = w_bicubic; *support = 2.0; return 0;
    case PC_LANCZOS: *fn = w_lanczos; *support = 3.0; return 0;
    }
    return -1;
}

/* ------------------------------------------------------------------ per-thread buffers */
typedef struct {
    void *p;
    size_t cap;
} buf_t;

static __thread buf_t tb_first, tb_count, tb_weight, tb_tmp, tb_dwork, tb_vbounds, tb_vweight;
#if defined(PC_AVX512) || defined(PC_AVX2)
static __thread buf_t tb_wide, tb_vstart;
#endif

static void *grow(buf_t *b, size_t bytes) {
    if (bytes <= b->cap) return b->p;
    free(b->p);
    b->cap = 0;
    bytes = (bytes + 4095) & ~(size_t)4095;
    if (posix_memalign(&b->p, 64, bytes) != 0) {
        b->p = NULL;
        return NULL;
    }
    b->cap = bytes;
    return b->p;
}

/* -------------------------------------------------------------------------- weights */
/* Weights of a resize of the span [in0, in1) of `in_size` input pixels to `out_size`, Pillow's
 * way (in0 and in1 are single-precision floats, as Pillow's box). Per output pixel o: first
 * input index first[o], count[o] taps and weights w[o * ksize + j] (22-bit fixed point).
 * `dwork` holds the double weights of one row. */
static void weights(int in_size, float in0, float in1, int out_size, weight_fn fn, double fsupport, int *first,
                    int *count, int32_t *w, int ksize, double *dwork) {
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = fsupport * filterscale;
    double inv = 1.0 / filterscale;
    for (int o = 0; o < out_size; o++) {
        double center = in0 + (o + 0.5) * scale;
        double sum = 0.0;
        int lo = (int)(center - support + 0.5);
        if (lo < 0) lo = 0;
        int hi = (int)(center + support + 0.5);
        if (hi > in_size) hi = in_size;
        int n = hi - lo;
        for (int j = 0; j < n; j++) {
            double v = fn((j + lo - center + 0.5) * inv);
            dwork[j] = v;
            sum += v;
        }
        if (sum != 0.0)
            for (int j = 0; j < n; j++) dwork[j] /= sum;
        int32_t *row = w + (size_t)o * ksize;
        for (int j = 0; j < n; j++) {
            double v = dwork[j];
            row[j] = v < 0 ? (int32_t)(-0.5 + v * (1 << PC_BITS)) : (int32_t)(0.5 + v * (1 << PC_BITS));
        }
        for (int j = n; j < ksize; j++) row[j] = 0;
        first[o] = lo;
        count[o] = n;
    }
}

static int kernel_size(float in0, float in1, int out_size, double fsupport) {
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    return (int)ceil(fsupport * filterscale) * 2 + 1;
}

static inline uint8_t clip8(int32_t s) {
    s >>= PC_BITS;
    return s < 0 ? 0 : (s > 255 ? 255 : (uint8_t)s);
}

/* ------------------------------------------------------------------ horizontal pass */
/* Output column c of the horizontal pass reads `taps` pixels of a source row from pixel
 * start[c] on (ascending memory), with weights wide[c][*] (scalar: one int32 per tap; vector:
 * each tap's weight repeated in the 4 lanes of its pixel). */

static void hpass_scalar(const uint8_t *src, int64_t row_stride, int ps, int row0, int nrows,
                         const int *start, const int *count, const int32_t *w, int ksize, int out_w,
                         uint8_t *tmp, int64_t plane, int tmp_stride) {
    for (int r = 0; r < nrows; r++) {
        const uint8_t *line = src + (int64_t)(row0 + r) * row_stride;
        uint8_t *t0 = tmp + (int64_t)r * tmp_stride, *t1 = t0 + plane, *t2 = t1 + plane;
        for (int c = 0; c < out_w; c++) {
            const uint8_t *p = line + (int64_t)start[c] * ps;
            const int32_t *k = w + (size_t)c * ksize;
            int32_t s0 = PC_HALF, s1 = PC_HALF, s2 = PC_HALF;
            for (int j = 0, n = count[c]; j < n; j++, p += ps) {
                s0 += p[0] * k[j];
                s1 += p[1] * k[j];
                s2 += p[2] * k[j];
            }
            t0[c] = clip8(s0);
            t1[c] = clip8(s1);
            t2[c] = clip8(s2);
        }
    }
}

#if defined(PC_AVX512) || defined(PC_AVX2)
/* bytes of 4 pixels (RGBX...) -> planar R0R1R2R3 G0G1G2G3 B0B1B2B3 (X dropped) */
static inline __m128i planar4(__m128i v) {
    return _mm_shuffle_epi8(v, _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, -1, -1, -1, -1));
}

static inline void store4(uint8_t *t0, int64_t plane, __m128i bytes) {
    __m128i p = planar4(bytes);
    uint32_t r = (uint32_t)_mm_cvtsi128_si32(p), g = (uint32_t)_mm_extract_epi32(p, 1),
             b = (uint32_t)_mm_extract_epi32(p, 2);
    memcpy(t0, &r, 4);
    memcpy(t0 + plane, &g, 4);
    memcpy(t0 + 2 * plane, &b, 4);
}

/* RGB (3 bytes a pixel) -> RGBX with X = 0, 4 pixels */
#define PC_RGB_TO_RGBX _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1)
#endif

#if defined(PC_AVX512)
static inline __m512i load4px(const uint8_t *p, int ps) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    if (ps == 3) v = _mm_shuffle_epi8(v, PC_RGB_TO_RGBX);
    return _mm512_cvtepu8_epi32(v);
}

/* sum the four 128-bit blocks of a, b, c, d: [sum(a), sum(b), sum(c), sum(d)] */
static inline __m512i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x44), _mm512_shuffle_i32x4(a, b, 0xEE));
    __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(c, d, 0x44), _mm512_shuffle_i32x4(c, d, 0xEE));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
}

static inline __m128i finish16(__m512i s) { /* 16 sums -> 16 clipped bytes */
    s = _mm512_srai_epi32(_mm512_add_epi32(s, _mm512_set1_epi32(PC_HALF)), PC_BITS);
    s = _mm512_max_epi32(s, _mm512_setzero_si512());
    return _mm512_cvtusepi32_epi8(s);
}

static void hpass_vec_ps(const uint8_t *src, int64_t row_stride, const int ps, int row0, int nrows,
                         const int *start, const int32_t *wide, int kpad, int out_w, uint8_t *tmp,
                         int64_t plane, int tmp_stride) {
    const int groups = kpad / 4;
    const int64_t wstride = (int64_t)kpad * 4; /* int32 per column */
    const int64_t gstep = 4 * ps;               /* bytes per group of 4 taps */
    int c4 = out_w & ~3;
    /* two rows at a time (each weight vector loaded once for both), four columns at a time
     * (one reduction of their four 128-bit blocks) */
    for (int r = 0; r < nrows; r += 2) {
        const uint8_t *line0 = src + (int64_t)(row0 + r) * row_stride;
        const uint8_t *line1 = r + 1 < nrows ? line0 + row_stride : line0; /* odd count: row twice */
        uint8_t *t0 = tmp + (int64_t)r * tmp_stride;
        int c = 0;
        for (; c < c4; c += 4) {
            const int64_t o0 = (int64_t)start[c] * ps, o1 = (int64_t)start[c + 1] * ps,
                          o2 = (int64_t)start[c + 2] * ps, o3 = (int64_t)start[c + 3] * ps;
            const int32_t *k0 = wide + c * wstride, *k1 = k0 + wstride, *k2 = k1 + wstride, *k3 = k2 + wstride;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int g = 0; g < groups; g++) {
                const int64_t off = g * gstep;
                __m512i w;
                w = _mm512_load_si512(k0 + 16 * g);
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(load4px(line0 + o0 + off, ps), w));
                b0 = _mm512_add_epi32(b0, _mm512_mullo_epi32(load4px(line1 + o0 + off, ps), w));
                w = _mm512_load_si512(k1 + 16 * g);
                a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(load4px(line0 + o1 + off, ps), w));
                b1 = _mm512_add_epi32(b1, _mm512_mullo_epi32(load4px(line1 + o1 + off, ps), w));
                w = _mm512_load_si512(k2 + 16 * g);
                a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(load4px(line0 + o2 + off, ps), w));
                b2 = _mm512_add_epi32(b2, _mm512_mullo_epi32(load4px(line1 + o2 + off, ps), w));
                w = _mm512_load_si512(k3 + 16 * g);
                a3 = _mm512_add_epi32(a3, _mm512_mullo_epi32(load4px(line0 + o3 + off, ps), w));
                b3 = _mm512_add_epi32(b3, _mm512_mullo_epi32(load4px(line1 + o3 + off, ps), w));
            }
            store4(t0 + c, plane, finish16(reduce4(a0, a1, a2, a3)));
            if (r + 1 < nrows) store4(t0 + tmp_stride + c, plane, finish16(reduce4(b0, b1, b2, b3)));
        }
        for (int rr = r; rr < r + 2 && rr < nrows; rr++) {
            const uint8_t *line = src + (int64_t)(row0 + rr) * row_stride;
            uint8_t *t = tmp + (int64_t)rr * tmp_stride;
            for (int cc = c; cc < out_w; cc++) {
                const uint8_t *p = line + (int64_t)start[cc] * ps;
                const int32_t *k = wide + cc * wstride;
                __m512i a = _mm512_setzero_si512();
                for (int g = 0; g < groups; g++)
                    a = _mm512_add_epi32(a, _mm512_mullo_epi32(load4px(p + g * gstep, ps), _mm512_load_si512(k + 16 * g)));
                __m512i z = _mm512_setzero_si512();
                uint8_t px[16];
                _mm_storeu_si128((__m128i *)px, finish16(reduce4(a, z, z, z)));
                t[cc] = px[0];
                t[cc + plane] = px[1];
                t[cc + 2 * plane] = px[2];
            }
        }
    }
}
#elif defined(PC_AVX2)
static inline __m256i load2px(const uint8_t *p, int ps) {
    __m128i v = _mm_loadl_epi64((const __m128i *)p);
    if (ps == 3) v = _mm_shuffle_epi8(v, PC_RGB_TO_RGBX);
    return _mm256_cvtepu8_epi32(v);
}

static inline __m128i sum2(__m256i a) { /* the two 128-bit halves added */
    return _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
}

static inline __m128i finish4x4(__m128i a, __m128i b, __m128i c, __m128i d) {
    const __m128i half = _mm_set1_epi32(PC_HALF);
    a = _mm_srai_epi32(_mm_add_epi32(a, half), PC_BITS);
    b = _mm_srai_epi32(_mm_add_epi32(b, half), PC_BITS);
    c = _mm_srai_epi32(_mm_add_epi32(c, half), PC_BITS);
    d = _mm_srai_epi32(_mm_add_epi32(d, half), PC_BITS);
    return _mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d));
}

static void hpass_vec_ps(const uint8_t *src, int64_t row_stride, const int ps, int row0, int nrows,
                         const int *start, const int32_t *wide, int kpad, int out_w, uint8_t *tmp,
                         int64_t plane, int tmp_stride) {
    const int groups = kpad / 2;
    const int64_t wstride = (int64_t)kpad * 4;
    int c4 = out_w & ~3;
    for (int r = 0; r < nrows; r++) {
        const uint8_t *line = src + (int64_t)(row0 + r) * row_stride;
        uint8_t *t = tmp + (int64_t)r * tmp_stride;
        int c = 0;
        for (; c < out_w; c += 4) {
            __m128i s[4];
            int m = c < c4 ? 4 : out_w - c;
            for (int q = 0; q < 4; q++) {
                if (q >= m) {
                    s[q] = _mm_setzero_si128();
                    continue;
                }
                const uint8_t *p = line + (int64_t)start[c + q] * ps;
                const int32_t *k = wide + (c + q) * wstride;
                __m256i a = _mm256_mullo_epi32(load2px(p, ps), _mm256_load_si256((const __m256i *)k));
                for (int g = 1; g < groups; g++)
                    a = _mm256_add_epi32(a, _mm256_mullo_epi32(load2px(p + 2 * g * ps, ps),
                                                               _mm256_load_si256((const __m256i *)(k + 8 * g))));
                s[q] = sum2(a);
            }
            __m128i bytes = finish4x4(s[0], s[1], s[2], s[3]);
            if (m == 4) {
                store4(t + c, plane, bytes);
            } else {
                uint8_t px[16];
                _mm_storeu_si128((__m128i *)px, bytes);
                for (int q = 0; q < m; q++) {
                    t[c + q] = px[4 * q];
                    t[c + q + plane] = px[4 * q + 1];
                    t[c + q + 2 * plane] = px[4 * q + 2];
                }
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------- vertical pass */
/* out[y][x] = clip((2^21 + sum_j in[first[y] + j][x] * w[y][j]) >> 22) for x < out_w bytes */
static void vpass(const uint8_t *in, int64_t tmp_stride, int out_w, int out_h, const int *first,
                  const int *count, const int32_t *w, int ksize, uint8_t *dst, int64_t dst_stride) {
    for (int y = 0; y < out_h; y++) {
        const uint8_t *rows = in + (int64_t)first[y] * tmp_stride;
        const int32_t *k = w + (size_t)y * ksize;
        const int n = count[y];
        uint8_t *out = dst + (int64_t)y * dst_stride;
        int x = 0;
#if defined(PC_AVX512)
        for (; x + 64 <= out_w; x += 64) {
            __m512i a0 = _mm512_set1_epi32(PC_HALF), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < n; j++) {
                const uint8_t *p = rows + (int64_t)j * tmp_stride + x;
                __m512i kv = _mm512_set1_epi32(k[j]);
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)), kv));
                a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))), kv));
                a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 32))), kv));
                a3 = _mm512_add_epi32(a3, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 48))), kv));
            }
            const __m512i z = _mm512_setzero_si512();
            _mm_storeu_si128((__m128i *)(out + x), _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a0, PC_BITS), z)));
            _mm_storeu_si128((__m128i *)(out + x + 16), _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a1, PC_BITS), z)));
            _mm_storeu_si128((__m128i *)(out + x + 32), _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a2, PC_BITS), z)));
            _mm_storeu_si128((__m128i *)(out + x + 48), _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a3, PC_BITS), z)));
        }
        for (; x + 16 <= out_w; x += 16) {
            __m512i a0 = _mm512_set1_epi32(PC_HALF);
            for (int j = 0; j < n; j++) {
                const uint8_t *p = rows + (int64_t)j * tmp_stride + x;
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)),
                                                             _mm512_set1_epi32(k[j])));
            }
            _mm_storeu_si128((__m128i *)(out + x),
                             _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a0, PC_BITS), _mm512_setzero_si512())));
        }
#elif defined(PC_AVX2)
        for (; x + 32 <= out_w; x += 32) {
            __m256i a0 = _mm256_set1_epi32(PC_HALF), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < n; j++) {
                const uint8_t *p = rows + (int64_t)j * tmp_stride + x;
                __m256i kv = _mm256_set1_epi32(k[j]);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))), kv));
                a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 16))), kv));
                a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 24))), kv));
            }
            a0 = _mm256_srai_epi32(a0, PC_BITS);
            a1 = _mm256_srai_epi32(a1, PC_BITS);
            a2 = _mm256_srai_epi32(a2, PC_BITS);
            a3 = _mm256_srai_epi32(a3, PC_BITS);
            /* packs/packus work within 128-bit lanes: restore the order with a permute */
            __m256i w01 = _mm256_packs_epi32(a0, a1), w23 = _mm256_packs_epi32(a2, a3);
            __m256i b = _mm256_packus_epi16(w01, w23);
            b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(out + x), b);
        }
#endif
        for (; x < out_w; x++) {
            int32_t s = PC_HALF;
            for (int j = 0; j < n; j++) s += rows[(int64_t)j * tmp_stride + x] * k[j];
            out[x] = clip8(s);
        }
    }
}

/* ------------------------------------------------------------------------ entry points */
int pc_abi_version(void) { return PC_ABI_VERSION; }

/* Taps per vector of the compiled code path (1: scalar only). */
int pc_vector_taps(void) { return PC_TAPS; }

/* The horizontal pass of rows [0, nrows) of `src` (pixel c of output row r: taps count[c]
 * from pixel start[c] on, weights w[c * kh ...]) into planar output rows (three planes
 * `plane` bytes apart, rows `out_stride` apart). `last_row_is_end`: the last row ends the
 * source's memory (a 3-byte-pixel vector read may pass a row's end by 4 bytes). */
static int hpass(const uint8_t *src, int64_t row_stride, int ps, int src_w, int nrows, int last_row_is_end,
                 const int *start, const int *count, const int32_t *w, int kh, int out_w, uint8_t *out,
                 int64_t plane, int out_stride, int scalar) {
    int maxn = 1;
    for (int c = 0; c < out_w; c++) maxn = count[c] > maxn ? count[c] : maxn;
    int kpad = (maxn + PC_TAPS - 1) / PC_TAPS * PC_TAPS;
    int vec = PC_TAPS > 1 && !scalar && kpad <= src_w;
    int vrows = 0; /* rows done by the vector code */
#if defined(PC_AVX512) || defined(PC_AVX2)
    if (vec) {
        /* widen: each tap's weight in the 4 lanes of its pixel, zero weights as padding; the
         * window of kpad pixels moved left where it would pass the row's end (zero weights
         * there) */
        int32_t *wide = grow(&tb_wide, sizeof(int32_t) * 4 * (size_t)kpad * out_w + 64);
        int *vstart = grow(&tb_vstart, sizeof(int) * (size_t)out_w);
        if (!wide || !vstart) return -2;
        for (int c = 0; c < out_w; c++) {
            int s = start[c], n = count[c];
            int s2 = s + kpad > src_w ? src_w - kpad : s;
            int d = s - s2;
            int32_t *o = wide + (size_t)c * kpad * 4;
            memset(o, 0, sizeof(int32_t) * 4 * (size_t)kpad);
            const int32_t *k = w + (size_t)c * kh;
            for (int j = 0; j < n; j++) o[4 * (d + j)] = o[4 * (d + j) + 1] = o[4 * (d + j) + 2] = k[j];
            vstart[c] = s2;
        }
        vrows = (ps == 3 && last_row_is_end) ? nrows - 1 : nrows;
        if (ps == 4)
            hpass_vec_ps(src, row_stride, 4, 0, vrows, vstart, wide, kpad, out_w, out, plane, out_stride);
        else
            hpass_vec_ps(src, row_stride, 3, 0, vrows, vstart, wide, kpad, out_w, out, plane, out_stride);
    }
#endif
    (void)vec;
    (void)last_row_is_end;
    if (vrows < nrows)
        hpass_scalar(src, row_stride, ps, vrows, nrows - vrows, start, count, w, kh, out_w,
                     out + (int64_t)vrows * out_stride, plane, out_stride);
    return 0;
}

/*
 * Pillow's resize of an RGB image: the `region` (left, top, crop_w, crop_h) of the source is
 * the image Pillow sees, and its span (b0, b1, b2, b3) (region coordinates, floats, as the
 * `box` argument of Image.resize) is resized to out_w x out_h with `filter` (Pillow's filter
 * numbers: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING). The result goes to dst as
 * uint8 [3][out_h][out_w]. img.crop(c).resize(size, f) is the region c with the span
 * (0, 0, width, height); img.resize(size, f, box=b) is the whole image with the span b.
 *   src, src_w, src_h, row_stride, ps: the image; pixel (x, y) channel c at
 *       src[y * row_stride + x * ps + c]; ps is 3 (RGB) or 4 (RGBX).
 *   mirror_src: the region is one of the left-right mirrored image (its pixel x is the
 *       source's src_w - 1 - x).
 *   mirror_out: the output is mirrored left-right.
 *   order: which pass runs first when both are needed: 0 always the horizontal one (Pillow
 *       up to 12); 1 the vertical one when the height shrinks by more than twice what the
 *       width shrinks, (crop_h - out_h) > max(0, 2 (crop_w - out_w)) (Pillow 13).
 *   scalar: 1 forces the scalar code (tests).
 * Returns 0, -1 for invalid arguments, -2 when out of memory.
 */
int pc_resample(const uint8_t *src, int src_w, int src_h, int64_t row_stride, int ps, int left, int top,
                int crop_w, int crop_h, int mirror_src, float b0, float b1, float b2, float b3, int out_w,
                int out_h, int filter, int mirror_out, int order, uint8_t *dst, int scalar) {
    weight_fn fn;
    double fsupport;
    if (!src || !dst || (ps != 3 && ps != 4) || filter_of(filter, &fn, &fsupport) != 0) return -1;
    if (crop_w < 1 || crop_h < 1 || out_w < 1 || out_h < 1 || left < 0 || top < 0 || left + crop_w > src_w ||
        top + crop_h > src_h || row_stride < (int64_t)src_w * ps)
        return -1;
    if (!(b0 >= 0 && b1 >= 0 && b2 <= crop_w && b3 <= crop_h && b2 > b0 && b3 > b1)) return -1;
    const int64_t plane = (int64_t)out_w * out_h;
    const int need_h = out_w != crop_w || b0 != 0 || b2 != out_w;
    const int need_v = out_h != crop_h || b1 != 0 || b3 != out_h;
    const int vertical_first = order == 1 && need_h && need_v && crop_h - out_h > 0 &&
                               crop_h - out_h > 2 * (crop_w - out_w);

    /* weights; a skipped pass is a copy: one tap of weight 1 ((2^21 + v 2^22) >> 22 = v) */
    int kv = need_v ? kernel_size(b1, b3, out_h, fsupport) : 1;
    int kh = need_h ? kernel_size(b0, b2, out_w, fsupport) : 1;
    int *vfirst = grow(&tb_vbounds, sizeof(int) * 2 * (size_t)out_h);
    int32_t *vw = grow(&tb_vweight, sizeof(int32_t) * (size_t)out_h * kv);
    int *start = grow(&tb_first, sizeof(int) * (size_t)out_w);
    int *count = grow(&tb_count, sizeof(int) * (size_t)out_w);
    int32_t *w = grow(&tb_weight, sizeof(int32_t) * (size_t)out_w * kh);
    double *dwork = grow(&tb_dwork, sizeof(double) * (size_t)(kv > kh ? kv : kh));
    if (!vfirst || !vw || !start || !count || !w || !dwork) return -2;
    int *vcount = vfirst + out_h;
    if (need_v) {
        weights(crop_h, b1, b3, out_h, fn, fsupport, vfirst, vcount, vw, kv, dwork);
    } else {
        for (int y = 0; y < out_h; y++) {
            vfirst[y] = y;
            vcount[y] = 1;
            vw[y] = 1 << PC_BITS;
        }
    }
    if (need_h) {
        weights(crop_w, b0, b2, out_w, fn, fsupport, start, count, w, kh, dwork);
    } else {
        for (int c = 0; c < out_w; c++) {
            start[c] = c;
            count[c] = 1;
            w[c] = 1 << PC_BITS;
        }
    }
    /* horizontal taps: crop index -> source pixel, read in ascending memory order (a
     * mirrored source: reversed weights); a mirrored output permutes the columns */
    for (int c = 0; c < out_w; c++) {
        int n = count[c];
        if (mirror_src) {
            start[c] = src_w - left - start[c] - n;
            int32_t *k = w + (size_t)c * kh;
            for (int i = 0, j = n - 1; i < j; i++, j--) {
                int32_t t = k[i];
                k[i] = k[j];
                k[j] = t;
            }
        } else {
            start[c] += left;
        }
    }
    if (mirror_out) {
        for (int i = 0, j = out_w - 1; i < j; i++, j--) {
            int t = start[i];
            start[i] = start[j];
            start[j] = t;
            t = count[i];
            count[i] = count[j];
            count[j] = t;
            for (int q = 0; q < kh; q++) {
                int32_t u = w[(size_t)i * kh + q];
                w[(size_t)i * kh + q] = w[(size_t)j * kh + q];
                w[(size_t)j * kh + q] = u;
            }
        }
    }

    if (!vertical_first) {
        /* horizontal pass over the rows the vertical pass reads -> planar tmp, then vertical */
        int row0 = need_v ? vfirst[0] : 0;
        int row1 = need_v ? vfirst[out_h - 1] + vcount[out_h - 1] : crop_h;
        const int nrows = row1 - row0;
        const uint8_t *base = src + (int64_t)(top + row0) * row_stride;
        if (!need_v) /* the horizontal pass writes the result */
            return hpass(base, row_stride, ps, src_w, nrows, top + row1 == src_h, start, count, w, kh, out_w,
                         dst, plane, out_w, scalar);
        const int64_t tplane = (int64_t)nrows * out_w;
        uint8_t *tmp = grow(&tb_tmp, (size_t)(3 * tplane + 64));
        if (!tmp) return -2;
        int rc = hpass(base, row_stride, ps, src_w, nrows, top + row1 == src_h, start, count, w, kh, out_w, tmp,
                       tplane, out_w, scalar);
        if (rc) return rc;
        for (int y = 0; y < out_h; y++) vfirst[y] -= row0;
        for (int ch = 0; ch < 3; ch++)
            vpass(tmp + ch * tplane, out_w, out_w, out_h, vfirst, vcount, vw, kv, dst + ch * plane, out_w);
        return 0;
    }

    /* vertical pass first, over the source columns the horizontal pass reads (interleaved
     * pixels, all bytes of each), then the horizontal pass on its result */
    int col0 = start[0], col1 = start[0] + count[0];
    for (int c = 1; c < out_w; c++) {
        col0 = start[c] < col0 ? start[c] : col0;
        col1 = start[c] + count[c] > col1 ? start[c] + count[c] : col1;
    }
    const int ncols = col1 - col0;
    const int tstride = ncols * ps;
    uint8_t *tmp = grow(&tb_tmp, (size_t)tstride * out_h + 64);
    if (!tmp) return -2;
    vpass(src + (int64_t)top * row_stride + (int64_t)col0 * ps, row_stride, tstride, out_h, vfirst, vcount, vw, kv,
          tmp, tstride);
    for (int c = 0; c < out_w; c++) start[c] -= col0;
    return hpass(tmp, tstride, ps, ncols, out_h, 0, start, count, w, kh, out_w, dst, plane, out_w, scalar);
}

/* --------------------------------------------------------------------- Arrow access */
/* The Arrow C data interface structures (a stable ABI): Pillow (>= 11.2) exports an image
 * without copying it, RGB as a fixed-size list of 4 uint8 per pixel (RGBX). */
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

/* The RGBX pixels of an exported `npix`-pixel image, or NULL when the export is not the
 * expected layout (fixed-size list "+w:4" of uint8 "C", no offset, one child). */
const uint8_t *pc_arrow_rgbx(const struct ArrowSchema *schema, const struct ArrowArray *array, int64_t npix) {
    if (!schema || !array || !schema->format || strcmp(schema->format, "+w:4") != 0 || schema->n_children != 1 ||
        !schema->children || !schema->children[0] || !schema->children[0]->format ||
        strcmp(schema->children[0]->format, "C") != 0)
        return NULL;
    if (array->length != npix || array->offset != 0 || array->n_children != 1 || !array->children ||
        !array->children[0])
        return NULL;
    const struct ArrowArray *child = array->children[0];
    if (child->length != 4 * npix || child->offset != 0 || child->n_buffers != 2 || !child->buffers ||
        !child->buffers[1])
        return NULL;
    return (const uint8_t *)child->buffers[1];
}
