// Decode-time matrix-vector products that read the weights at the memory's bandwidth (AVX-512).
//
// At one or two rows of activations a matmul reads every weight once and does one multiply-add with it, so the
// kernel's speed is the speed it streams the weight matrix from memory. One CPU core reaches its share of the
// bandwidth only with many cache-line requests in flight: each thread walks a contiguous block of rows, four
// rows at a time, and asks for the rows two blocks ahead (software prefetch) while it computes on these.
// Weights are converted to float32 in registers; products accumulate in float32; x is read as float32 except
// in the bf16 x bf16 case, which uses the CPU's bf16 dot-product instruction (products are exact in float32).
//
// Registered as torch operators (torch.ops.course_lib.*), so torch.compile traces them into a decode step's
// graph as calls. Built at first use by course_lib/quantization/native.py, with -march=native.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <torch/library.h>

#include "load16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t ROWS = 4;  // rows per block: four independent accumulators
constexpr int64_t AHEAD = 2;  // prefetch the block this many blocks ahead

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

using course_lib_native::load16;

inline void prefetch_block(const void* base, int64_t row_bytes, int64_t offset_bytes) {
  const char* p = static_cast<const char*>(base) + offset_bytes;
  for (int64_t i = 0; i < ROWS; ++i) _mm_prefetch(p + i * row_bytes, _MM_HINT_T0);
}

// Rows [n0, n1) of y = (x @ w.T) * scale for R rows of x (float32, K wide); no scale when it is null.
// Full blocks of ROWS, then single rows.
template <typename W, typename S, int R>
void float_rows(const float* x, const W* w, const S* scale, float* y, int64_t N, int64_t K, int64_t n0,
                int64_t n1) {
  const int64_t kv = K - K % 16, row_bytes = K * sizeof(W);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    __m512 acc[R][ROWS];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < ROWS; ++i) acc[r][i] = _mm512_setzero_ps();
    const W* w0 = w + n * K;
    const bool pf = n + (AHEAD + 1) * ROWS <= n1;
    for (int64_t k = 0; k < kv; k += 16) {
      if (pf && (k * sizeof(W)) % 64 == 0) prefetch_block(w0, row_bytes, AHEAD * ROWS * row_bytes + k * sizeof(W));
      __m512 wv[ROWS];
      for (int i = 0; i < ROWS; ++i) wv[i] = load16(w0 + i * K + k);
      for (int r = 0; r < R; ++r) {
        __m512 xv = _mm512_loadu_ps(x + r * K + k);
        for (int i = 0; i < ROWS; ++i) acc[r][i] = _mm512_fmadd_ps(xv, wv[i], acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < ROWS; ++i) {
        float s = hsum(acc[r][i]);
        for (int64_t k = kv; k < K; ++k) s += x[r * K + k] * static_cast<float>(w0[i * K + k]);
        y[r * N + n + i] = scale ? s * static_cast<float>(scale[n + i]) : s;
      }
  }
  for (; n < n1; ++n) {
    const W* wr = w + n * K;
    for (int r = 0; r < R; ++r) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < kv; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), load16(wr + k), a);
      float s = hsum(a);
      for (int64_t k = kv; k < K; ++k) s += x[r * K + k] * static_cast<float>(wr[k]);
      y[r * N + n] = scale ? s * static_cast<float>(scale[n]) : s;
    }
  }
}

#ifdef __AVX512BF16__
constexpr int64_t BF16_ROWS = 16;  // rows of x the bf16 x bf16 kernel takes (native.BF16_ROWS): a verification pass
constexpr int XR = 4;  // rows of x per pass over a weight block: 4 x 4 accumulators stay in registers

// bf16 x bf16: the dot-product instruction takes 32 pairs per call, no conversion of the weights.
// One block of ROWS weight rows (from w0, output columns from n) against NR rows of x (each K wide, contiguous).
template <int NR>
inline void bf16_block_dp(const c10::BFloat16* x, const c10::BFloat16* w0, float* y, int64_t N, int64_t K, int64_t n,
                          bool pf) {
  const int64_t row_bytes = K * 2;
  __m512 acc[NR][ROWS];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < ROWS; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    if (pf) prefetch_block(w0, row_bytes, AHEAD * ROWS * row_bytes + k * 2);
    __m512bh wv[ROWS];
    for (int i = 0; i < ROWS; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(w0 + i * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
      for (int i = 0; i < ROWS; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xv, wv[i]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < ROWS; ++i) y[r * N + n + i] = hsum(acc[r][i]);
}

// Weight rows [n0, n1) against R rows of x, R up to BF16_ROWS. Each block of weight rows is read from memory
// once: the first group of XR x rows streams it (and prefetches ahead), the next groups find it in L1. Every
// (x row, weight row) sum runs over k in the same order whatever R is, so a row's result does not depend on how
// many rows came with it: a speculative verification pass scores each token exactly as a one-token step would.
void bf16_rows_dp(const c10::BFloat16* x, int64_t R, const c10::BFloat16* w, float* y, int64_t N, int64_t K,
                  int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS) {
    const c10::BFloat16* w0 = w + n * K;
    const bool pf = n + (AHEAD + 1) * ROWS <= n1;
    for (int64_t r0 = 0; r0 < R; r0 += XR) {
      const c10::BFloat16* xr = x + r0 * K;
      float* yr = y + r0 * N;
      switch (std::min<int64_t>(XR, R - r0)) {
        case 1: bf16_block_dp<1>(xr, w0, yr, N, K, n, pf && r0 == 0); break;
        case 2: bf16_block_dp<2>(xr, w0, yr, N, K, n, pf && r0 == 0); break;
        case 3: bf16_block_dp<3>(xr, w0, yr, N, K, n, pf && r0 == 0); break;
        default: bf16_block_dp<4>(xr, w0, yr, N, K, n, pf && r0 == 0); break;
      }
    }
  }
  for (; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(x + r * K + k),
                             (__m512bh)_mm512_loadu_si512(w + n * K + k));
      y[r * N + n] = hsum(a);
    }
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX, the CPU's matrix unit (the CPU's counterpart of a GPU's tensor cores): one instruction multiplies a
// 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16 float32 tile. A decode step reads each weight once whatever
// the number of rows, but the vector dot products above do one multiply-add per weight per row, so a pass of
// several rows (a speculative verification) becomes bound by the arithmetic. Here the weights are tile A
// (16 output rows x 32 inputs, read straight from the (N, K) matrix) and the rows of x are tile B (one column
// each, up to 16): 1 to 16 rows cost the same instructions, and the pass stays bound by reading the
// weights. Each output element is one chain of tile multiply-adds over k in the same order whatever R is.

// Linux hands out the tile registers on request, once per process; COURSE_NATIVE_AMX=0 keeps to the vector kernel.
bool amx_ready() {
  static const bool ok = [] {
    const char* off = std::getenv("COURSE_NATIVE_AMX");
    if (off && std::string(off) == "0") return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

constexpr int64_t AMX_ROWS = 16;  // rows of x (B's columns) and weight rows per tile

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// 0, R, 2R, ..., 15R: the offsets of sixteen values that lie R apart (a tile's column, x's pairs in tile B)
inline __m512i spaced(int64_t R) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(R)));
}

// x's k pairs as tile B: R columns, xt[kk * R + m] = (x[m][2kk], x[m][2kk + 1]). One row is x itself; more are
// transposed into a buffer of the calling thread's (a decode step makes hundreds of these calls).
const uint32_t* amx_x(const c10::BFloat16* x, int64_t R, int64_t K) {
  const auto* x32 = reinterpret_cast<const uint32_t*>(x);
  if (R == 1) return x32;
  thread_local std::vector<uint32_t> xt;
  xt.resize(K / 2 * R);
  uint32_t* out = xt.data();
  // sixteen pairs of a row at a time, scattered R apart (K is a multiple of 32: whole vectors)
  const __m512i apart = spaced(R);
  for (int64_t m = 0; m < R; ++m)
    for (int64_t kk = 0; kk < K / 2; kk += 16)
      _mm512_i32scatter_epi32(out + kk * R + m, apart, _mm512_loadu_si512(x32 + m * (K / 2) + kk), 4);
  return out;
}

// One weight tile (16 rows from row n) against x: y[m][n + i] for m < R, one chain of tile multiply-adds over k.
// Prefetches the next tile (`ahead` bytes further) into L2 meanwhile: each step over k asks for 16 lines, as many
// as it reads.
inline void amx_tile(const uint32_t* xt, const c10::BFloat16* w, float* y, int64_t R, int64_t N, int64_t K, int64_t n,
                     int64_t ahead, __m512i apart) {
  const int64_t stride = K * 2, steps = K / 32;
  const char* next = reinterpret_cast<const char*>(w + n * K) + ahead;
  _tile_zero(0);
  for (int64_t s = 0; s < steps; ++s) {
    if (ahead)
      for (const char* q = next + s * AMX_ROWS * 64, *e = q + AMX_ROWS * 64; q < e; q += 64) _mm_prefetch(q, _MM_HINT_T1);
    _tile_loadd(1, xt + s * 16 * R, R * 4);
    _tile_loadd(2, w + n * K + s * 32, stride);
    _tile_dpbf16ps(0, 2, 1);
  }
  alignas(64) float c[AMX_ROWS * AMX_ROWS];
  _tile_stored(0, c, R * 4);
  for (int64_t m = 0; m < R; ++m)  // column m of the tile is row m's sixteen outputs: gathered R apart
    _mm512_storeu_ps(y + m * N + n, _mm512_i32gather_ps(apart, c + m, 4));
}

// Weight rows [n0, n1) (multiples of 16) against R <= 16 rows of x, one tile of 16 weight rows at a time: four
// tiles side by side (64 rows read at once) were slower at one row than the vector kernel, and far slower while
// other programs shared the memory bus (docs/decode.md).
void bf16_rows_amx(const uint32_t* xt, const c10::BFloat16* w, float* y, int64_t R, int64_t N, int64_t K, int64_t n0,
                   int64_t n1) {
  TileConfig cfg;  // tile 0: the 16 x R float32 sums; 1: x as R columns of bf16 pairs; 2: 16 weight rows x 32
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = AMX_ROWS;
    cfg.colsb[t] = t < 2 ? R * 4 : 64;
  }
  _tile_loadconfig(&cfg);
  const __m512i apart = spaced(R);
  const int64_t tile_bytes = AMX_ROWS * K * 2;
  for (int64_t n = n0; n < n1; n += AMX_ROWS)
    amx_tile(xt, w, y, R, N, K, n, n + 2 * AMX_ROWS <= n1 ? tile_bytes : 0, apart);
  _tile_release();
}
#define COURSE_LIB_AMX 1
#endif

// int4 in the halves layout: per group of g inputs, byte j holds input j (low nibble) and g/2 + j (high).
// The weight is (q - 8) * scale + zero, so y = sum_g scale_g * (x_g . q_g) + (zero_g - 8 scale_g) * sum(x_g).
// sz: scale of row n, group gi at sz[gi * sg + n * sn], its zero sn_c further (any layout; rows-major is fastest)
template <int R, typename S>
void int4_rows(const float* x, const float* xsum, const uint8_t* p, const S* sz, int64_t sg, int64_t sn, int64_t sc_,
               float* y, int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
  const int64_t G = K / g, half = g / 2, row_bytes = K / 2;
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t n = n0; n < n1; n += ROWS) {
    const int64_t rows = std::min(ROWS, n1 - n);  // the last block of a thread's range may be short
    __m512 acc[R][ROWS];
    float zacc[R][ROWS] = {};
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < ROWS; ++i) acc[r][i] = _mm512_setzero_ps();
    const uint8_t* p0 = p + n * row_bytes;
    const bool pf = n + (AHEAD + 1) * ROWS <= n1;
    for (int64_t gi = 0; gi < G; ++gi) {
      for (int64_t j = 0; j < half; j += 16) {
        const int64_t byte = gi * half + j;
        if (pf && byte % 64 == 0) prefetch_block(p0, row_bytes, AHEAD * ROWS * row_bytes + byte);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + i * row_bytes + byte)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
          const __m512 s = _mm512_set1_ps(static_cast<float>(sz[gi * sg + (n + i) * sn]));
          for (int r = 0; r < R; ++r) {
            const float* xr = x + r * K + gi * g + j;
            __m512 t = _mm512_mul_ps(hi, _mm512_loadu_ps(xr + half));
            t = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), t);
            acc[r][i] = _mm512_fmadd_ps(t, s, acc[r][i]);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const S* e = sz + gi * sg + (n + i) * sn;
        const float z = static_cast<float>(e[sc_]) - 8.0f * static_cast<float>(e[0]);
        for (int r = 0; r < R; ++r) zacc[r][i] += z * xsum[r * G + gi];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t i = 0; i < rows; ++i) y[r * N + n + i] = hsum(acc[r][i]) + zacc[r][i];
  }
}

#ifdef __AVX512BF16__
// int4 with bf16 activations (one row): 32 bytes (64 weights) per step through the bf16 dot-product instruction.
// A nibble q becomes the bf16 number 128 + q (bits 0x4300 | q: exact), so no int-to-float conversion is needed;
// the 128 returns through the group's sum of x, folded into its zero: y = sum_g s_g D_g + (z_g - 136 s_g) xsum_g
// with D_g = x_g . (128 + q_g). xlo/xhi hold x in the order of the bytes' low and high nibbles.
// zs (when sz is rows-major): [-136 xsum_0, xsum_0, -136 xsum_1, xsum_1, ...], the weights of a row's (scale, zero)
// pairs in its zero term.
// NR rows from row n: NR a compile-time count, so the accumulators stay in registers (a loop to a run-time count
// kept them on the stack: a store and a reload around every multiply-add, and the kernel compute-bound)
template <int NR, typename S>
inline void int4_block_dp(const c10::BFloat16* xlo, const c10::BFloat16* xhi, const float* xsum, const float* zs,
                          const uint8_t* p, const S* sz, int64_t sg, int64_t sn, int64_t sc_, float* y, int64_t K,
                          int64_t g, int64_t n, bool pf, __m512i sidx) {
  const int64_t G = K / g, half = g / 2, row_bytes = K / 2;
  const __m512i low = _mm512_set1_epi16(15), bias = _mm512_set1_epi16(0x4300);
  const bool pairs = sg == 2 && sc_ == 1 && half == 16;
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* p0 = p + n * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 32) {
    if (pf && b % 64 == 0) prefetch_block(p0, row_bytes, AHEAD * ROWS * row_bytes + b);
    const __m512bh xl = (__m512bh)_mm512_loadu_si512(xlo + b), xh = (__m512bh)_mm512_loadu_si512(xhi + b);
    // the groups of the first and second 16 bytes (a shift, not a division, in the common case of groups of 32)
    const int64_t ga = pairs ? b >> 4 : b / half, gb = pairs ? ga + 1 : (b + 16) / half;
    for (int i = 0; i < NR; ++i) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + i * row_bytes + b)));
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, low), bias);
      const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), xl, (__m512bh)lo);
      t = _mm512_dpbf16_ps(t, xh, (__m512bh)hi);
      const S* e = sz + (n + i) * sn;
      __m512 s;
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (pairs) {  // bf16 (scale, zero) pairs side by side, groups of 32: one 8-byte load holds both scales
          const __m512i v = _mm512_set1_epi64(*reinterpret_cast<const int64_t*>(e + ga * 2));
          s = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, sidx, v));
        } else {
          s = _mm512_insertf32x8(_mm512_set1_ps(static_cast<float>(e[ga * sg])),
                                 _mm256_set1_ps(static_cast<float>(e[gb * sg])), 1);
        }
      } else {
        s = _mm512_insertf32x8(_mm512_set1_ps(static_cast<float>(e[ga * sg])),
                               _mm256_set1_ps(static_cast<float>(e[gb * sg])), 1);
      }
      acc[i] = _mm512_fmadd_ps(t, s, acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    const S* e = sz + (n + i) * sn;
    float zacc = 0.0f;
    if (zs != nullptr) {  // rows-major: the row's (scale, zero) pairs are 2G contiguous values, one dot product
      __m512 z = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= 2 * G; j += 16) z = _mm512_fmadd_ps(load16(e + j), _mm512_loadu_ps(zs + j), z);
      zacc = hsum(z);
      for (; j < 2 * G; ++j) zacc += static_cast<float>(e[j]) * zs[j];
    } else {
      for (int64_t gi = 0; gi < G; ++gi)
        zacc += (static_cast<float>(e[gi * sg + sc_]) - 136.0f * static_cast<float>(e[gi * sg])) * xsum[gi];
    }
    y[n + i] = hsum(acc[i]) + zacc;
  }
}

template <typename S>
void int4_rows_dp(const c10::BFloat16* xlo, const c10::BFloat16* xhi, const float* xsum, const float* zs,
                  const uint8_t* p, const S* sz, int64_t sg, int64_t sn, int64_t sc_, float* y, int64_t K, int64_t g,
                  int64_t n0, int64_t n1) {
  // word 2l+1 of lane l (its float's high half) takes the first group's scale (word 0) for lanes 0-7, the
  // second's (word 2) for lanes 8-15; the low words are zeroed by the mask
  alignas(64) int16_t idx[32];
  for (int w = 0; w < 32; ++w) idx[w] = (w / 2) < 8 ? 0 : 2;
  const __m512i sidx = _mm512_load_si512(idx);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS)
    int4_block_dp<ROWS>(xlo, xhi, xsum, zs, p, sz, sg, sn, sc_, y, K, g, n, n + (AHEAD + 1) * ROWS <= n1, sidx);
  for (; n < n1; ++n) int4_block_dp<1>(xlo, xhi, xsum, zs, p, sz, sg, sn, sc_, y, K, g, n, false, sidx);
}
#endif

#ifdef __AVX512VNNI__
// int4 weights x int8 activations (W4A8, groups of 32), llama.cpp's Q4_0 x Q8_0: x is rounded to int8 with one
// scale per group of 32 inputs (the weights' groups), and each 64 bytes of a row (128 weights) take two
// integer dot-product instructions (unsigned nibbles times signed int8, four products summed per lane) instead
// of the bf16 path's four: half the instructions per weight, where the bf16 path is bound by them.
// Lane l of a 64-byte chunk at byte c sums bytes c+4l..c+4l+3, all in group c/16 + l/4, so one float scale per
// lane (the weight's group scale times the activations' group scale) turns the lane's integer sum into its
// share of y; the zero term uses the group's sum of the rounded x. ql/qh: the int8 x in the order of the bytes'
// low and high nibbles, zero-padded to whole chunks; da: the activations' scale of each lane, per chunk.
template <typename S>
inline __m512 scale_lanes(const S* e, __mmask8 m, __m512i sidx) {
  // the (scale, zero) pairs of four groups as floats in lanes 0-7, then lane l <- the scale of group l/4
  __m256 pairs;
  if constexpr (std::is_same_v<S, float>) {
    pairs = _mm256_maskz_loadu_ps(m, e);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const __m128i h = _mm_maskz_loadu_epi16(m, e);
    pairs = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    pairs = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, e));
  }
  return _mm512_permutexvar_ps(sidx, _mm512_castps256_ps512(pairs));
}

template <int NR, typename S>
inline void int4_a8_block(const int8_t* ql, const int8_t* qh, const float* da, const float* zs, const uint8_t* p,
                          const S* sz, float* y, int64_t K, int64_t n, bool pf, __m512i sidx) {
  const int64_t G = K / 32, row_bytes = K / 2, chunks = (row_bytes + 63) / 64;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* p0 = p + n * row_bytes;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * 64, left = row_bytes - b;
    const __mmask64 m = left >= 64 ? ~0ULL : (1ULL << left) - 1;  // the last chunk may be short (K/2 = 288)
    const __mmask8 mp = left >= 64 ? 0xFF : static_cast<__mmask8>((1u << (left / 8)) - 1);  // its scale pairs
    if (pf) prefetch_block(p0, row_bytes, AHEAD * ROWS * row_bytes + b);
    const __m512i xl = _mm512_loadu_si512(ql + b), xh = _mm512_loadu_si512(qh + b);
    const __m512 dv = _mm512_loadu_ps(da + c * 16);
    for (int i = 0; i < NR; ++i) {
      const __m512i v = _mm512_maskz_loadu_epi8(m, p0 + i * row_bytes + b);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl);
      d = _mm512_dpbusd_epi32(d, hi, xh);
      const __m512 s = _mm512_mul_ps(scale_lanes(sz + (n + i) * 2 * G + (b / 16) * 2, mp, sidx), dv);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    const S* e = sz + (n + i) * 2 * G;
    __m512 z = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= 2 * G; j += 16) z = _mm512_fmadd_ps(load16(e + j), _mm512_loadu_ps(zs + j), z);
    float zacc = hsum(z);
    for (; j < 2 * G; ++j) zacc += static_cast<float>(e[j]) * zs[j];
    y[n + i] = hsum(acc[i]) + zacc;
  }
}

template <typename S>
void int4_a8_rows(const int8_t* ql, const int8_t* qh, const float* da, const float* zs, const uint8_t* p, const S* sz,
                  float* y, int64_t K, int64_t n0, int64_t n1) {
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = 2 * (l / 4);  // lane l: the scale (even slot) of pair l/4
  const __m512i sidx = _mm512_load_si512(idx);
  int64_t n = n0;
  for (; n + ROWS <= n1; n += ROWS)
    int4_a8_block<ROWS>(ql, qh, da, zs, p, sz, y, K, n, n + (AHEAD + 1) * ROWS <= n1, sidx);
  for (; n < n1; ++n) int4_a8_block<1>(ql, qh, da, zs, p, sz, y, K, n, false, sidx);
}
#endif

// --- the operators ---------------------------------------------------------------------------

constexpr int64_t GRAIN = 64;  // rows per task at least: a 192-row matrix still splits over 3 threads

void check_x(const at::Tensor& x, int64_t K, int64_t max_rows = 2) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (rows, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= max_rows, "this kernel takes 1 to ", max_rows, " rows, got ",
              x.size(0));
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
}

// x as float32 rows, converted into a buffer of the caller's (no tensor allocated: a decode step calls these
// hundreds of times, and a layer of 576 x 192 streams in ~10 us)
const float* float_x(const at::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  auto xc = x.contiguous();
  buf.resize(xc.numel());
  if (xc.scalar_type() == at::kBFloat16) {
    const auto* p = xc.data_ptr<c10::BFloat16>();
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(p[i]);
  } else if (xc.scalar_type() == at::kHalf) {
    const auto* p = xc.data_ptr<c10::Half>();
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(p[i]);
  } else {
    TORCH_CHECK(xc.scalar_type() == at::kFloat, "x must be float32, bfloat16 or float16, got ", xc.scalar_type());
    const float* p = xc.data_ptr<float>();
    std::copy(p, p + buf.size(), buf.begin());
  }
  return buf.data();
}

template <typename W, typename S>
void run_float(const float* x, int64_t R, const W* w, const S* scale, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, (N + ROWS - 1) / ROWS, GRAIN / ROWS, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
    if (R == 1) float_rows<W, S, 1>(x, w, scale, y, N, K, n0, n1);
    else float_rows<W, S, 2>(x, w, scale, y, N, K, n0, n1);
  });
}

at::Tensor gemv_float(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "w must be a contiguous (N, K) CPU tensor");
  const int64_t N = w.size(0), K = w.size(1), R = x.size(0);
#ifdef __AVX512BF16__
  if (w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && K % 32 == 0) {
    check_x(x, K, BF16_ROWS);
    const auto xc = x.contiguous();
    auto y = at::empty({R, N}, x.options().dtype(at::kFloat));
    float* yp = y.data_ptr<float>();
    const auto* xp = xc.data_ptr<c10::BFloat16>();
    const auto* wp = w.data_ptr<c10::BFloat16>();
#ifdef COURSE_LIB_AMX
    // by shape only, one row included: a layer takes the same path at every row count, so a decode step and a
    // verification pass compute a row alike (one tile at a time reads as fast as the vector kernel)
    if (N % AMX_ROWS == 0 && amx_ready()) {
      const uint32_t* xt = amx_x(xp, R, K);
      at::parallel_for(0, N / AMX_ROWS, GRAIN / AMX_ROWS, [&](int64_t b0, int64_t b1) {
        bf16_rows_amx(xt, wp, yp, R, N, K, b0 * AMX_ROWS, b1 * AMX_ROWS);
      });
      return y;
    }
#endif
    at::parallel_for(0, (N + ROWS - 1) / ROWS, GRAIN / ROWS, [&](int64_t b0, int64_t b1) {
      bf16_rows_dp(xp, R, wp, yp, N, K, b0 * ROWS, std::min(N, b1 * ROWS));
    });
    return y;
  }
#endif
  check_x(x, K);
  auto y = at::empty({R, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  std::vector<float> buf;
  const float* xp = float_x(x, buf);
  const float* none = nullptr;
  switch (w.scalar_type()) {
    case at::kFloat: run_float(xp, R, w.data_ptr<float>(), none, yp, N, K); break;
    case at::kBFloat16: run_float(xp, R, w.data_ptr<c10::BFloat16>(), none, yp, N, K); break;
    case at::kHalf: run_float(xp, R, w.data_ptr<c10::Half>(), none, yp, N, K); break;
    default: TORCH_CHECK(false, "w must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return y;
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "q must be contiguous (N, K) int8");
  const int64_t N = q.size(0), K = q.size(1), R = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scales.numel() == N && scales.is_contiguous(), "scales must hold one scale per output channel (", N,
              "), contiguous");
  auto y = at::empty({R, N}, x.options().dtype(at::kFloat));
  std::vector<float> buf;
  const float* xp = float_x(x, buf);
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  switch (scales.scalar_type()) {
    case at::kFloat: run_float(xp, R, qp, scales.data_ptr<float>(), yp, N, K); break;
    case at::kBFloat16: run_float(xp, R, qp, scales.data_ptr<c10::BFloat16>(), yp, N, K); break;
    case at::kHalf: run_float(xp, R, qp, scales.data_ptr<c10::Half>(), yp, N, K); break;
    default: TORCH_CHECK(false, "scales must be float32, bfloat16 or float16, got ", scales.scalar_type());
  }
  return y;
}

// sz: (K/g, N, 2) as the layer stores it, any strides; read here as (N, K/g) scales and zeros.
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "packed must be contiguous (N, K/2) uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, g = group_size;
  check_x(x, K);
  TORCH_CHECK(g % 32 == 0 && K % g == 0, "group_size must be a multiple of 32 that divides K (", K, "), got ", g);
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == K / g && sz.size(1) == N && sz.size(2) == 2,
              "scales_and_zeros must be (K/group_size, N, 2)");
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16 || sz.scalar_type() == at::kHalf,
              "scales_and_zeros must be float32, bfloat16 or float16, got ", sz.scalar_type());
  const int64_t G = K / g, R = x.size(0);
  auto y = at::empty({R, N}, x.options().dtype(at::kFloat));
  std::vector<float> xsum(R * G);  // each group's sum of x: what the zeros multiply
  const float* xs = xsum.data();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // The set-up below runs once per call, on one thread, before the rows are split: plain copies and vector sums,
  // no index arithmetic per element (a division per element cost 4-10 us a call, 1 ms of a 30-layer step)
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16 && R == 1 && (K / 2) % 32 == 0) {  // bf16 activations: dot products, 32 bytes a step
    const auto xc = x.contiguous();
    const auto* xb = xc.data_ptr<c10::BFloat16>();
    const int64_t half = g / 2;
    std::vector<c10::BFloat16> xlh(K);  // x in the order of the bytes' low nibbles, then of their high nibbles
    c10::BFloat16* xlo = xlh.data();
    c10::BFloat16* xhi = xlo + K / 2;
    for (int64_t gi = 0; gi < G; ++gi) {
      const c10::BFloat16* src = xb + gi * g;
      std::copy(src, src + half, xlo + gi * half);
      std::copy(src + half, src + g, xhi + gi * half);
      __m512 a = _mm512_setzero_ps();
      for (int64_t j = 0; j < g; j += 16) a = _mm512_add_ps(a, load16(src + j));
      xsum[gi] = hsum(a);
    }
    std::vector<float> zs;
    if (sz.stride(2) == 1 && sz.stride(0) == 2 && sz.stride(1) == 2 * G) {
      zs.resize(2 * G);
      for (int64_t gi = 0; gi < G; ++gi) zs[2 * gi] = -136.0f * xs[gi], zs[2 * gi + 1] = xs[gi];
    }
    const float* zp = zs.empty() ? nullptr : zs.data();
    at::parallel_for(0, (N + ROWS - 1) / ROWS, GRAIN / ROWS, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
      auto go = [&](auto* s) {
        int4_rows_dp(xlo, xhi, xs, zp, pp, s, sz.stride(0), sz.stride(1), sz.stride(2), yp, K, g, n0, n1);
      };
      switch (sz.scalar_type()) {
        case at::kFloat: go(sz.data_ptr<float>()); break;
        case at::kBFloat16: go(sz.data_ptr<c10::BFloat16>()); break;
        default: go(sz.data_ptr<c10::Half>()); break;
      }
    });
    return y;
  }
#endif
  std::vector<float> buf;
  const float* xp = float_x(x, buf);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* src = xp + r * K + gi * g;
      __m512 a = _mm512_setzero_ps();
      for (int64_t j = 0; j < g; j += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(src + j));
      xsum[r * G + gi] = hsum(a);
    }
  at::parallel_for(0, (N + ROWS - 1) / ROWS, GRAIN / ROWS, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
    auto go = [&](auto* s) {
      if (R == 1) int4_rows<1>(xp, xs, pp, s, sz.stride(0), sz.stride(1), sz.stride(2), yp, N, K, g, n0, n1);
      else int4_rows<2>(xp, xs, pp, s, sz.stride(0), sz.stride(1), sz.stride(2), yp, N, K, g, n0, n1);
    };
    switch (sz.scalar_type()) {
      case at::kFloat: go(sz.data_ptr<float>()); break;
      case at::kBFloat16: go(sz.data_ptr<c10::BFloat16>()); break;
      case at::kHalf: go(sz.data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "scales_and_zeros must be float32, bfloat16 or float16");
    }
  });
  return y;
}

// int4 weights (groups of 32, rows-major scales) x activations rounded to int8 per group: y = W (round(x)).
// Returns (rows, N) float32; each row of x is rounded and multiplied on its own.
at::Tensor gemv_int4_a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz) {
#ifndef __AVX512VNNI__
  TORCH_CHECK(false, "gemv_int4_a8 needs a CPU with AVX512-VNNI");
#else
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "packed must be contiguous (N, K/2) uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32;
  check_x(x, K);
  TORCH_CHECK(K % 32 == 0, "in_features must be a multiple of 32 (the activations' groups), got ", K);
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == G && sz.size(1) == N && sz.size(2) == 2,
              "scales_and_zeros must be (K/32, N, 2)");
  TORCH_CHECK(sz.stride(2) == 1 && sz.stride(0) == 2 && sz.stride(1) == 2 * G,
              "scales_and_zeros must be rows-major (native.rows_major): each row's groups side by side");
  const int64_t R = x.size(0), half = K / 2, padded = (half + 63) / 64 * 64, chunks = padded / 64;
  auto y = at::empty({R, N}, x.options().dtype(at::kFloat));
  std::vector<float> buf;
  const float* xp = float_x(x, buf);
  std::vector<int8_t> ql(padded, 0), qh(padded, 0);
  std::vector<float> da(chunks * 16, 0.0f), zs(2 * G);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (int64_t r = 0; r < R; ++r) {
    // round each group of 32 inputs to int8 (scale max|x| / 127), in the order the packed bytes hold them
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* src = xp + r * K + gi * 32;
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::abs(src[j]));
      // d = max|x| * (1/127), q = x / d: round_activation_groups' arithmetic exactly (a reciprocal taken once
      // and multiplied would round differently, and a tie then goes the other way)
      const float d = amax * (1.0f / 127.0f), dd = amax > 0.0f ? d : 1.0f;
      int32_t qsum = 0;
      for (int j = 0; j < 16; ++j) {
        const int8_t lo = amax > 0.0f ? static_cast<int8_t>(std::nearbyint(src[j] / dd)) : 0;
        const int8_t hi = amax > 0.0f ? static_cast<int8_t>(std::nearbyint(src[16 + j] / dd)) : 0;
        ql[gi * 16 + j] = lo, qh[gi * 16 + j] = hi, qsum += lo + hi;
      }
      for (int l = 0; l < 4; ++l) da[gi * 4 + l] = d;  // the four lanes of its 16 bytes
      const float xs = d * static_cast<float>(qsum);  // the group's sum of the rounded x: what the zero multiplies
      zs[2 * gi] = -8.0f * xs, zs[2 * gi + 1] = xs;
    }
    float* yp = y.data_ptr<float>() + r * N;
    at::parallel_for(0, (N + ROWS - 1) / ROWS, GRAIN / ROWS, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * ROWS, n1 = std::min(N, b1 * ROWS);
      switch (sz.scalar_type()) {
        case at::kFloat: int4_a8_rows(ql.data(), qh.data(), da.data(), zs.data(), pp, sz.data_ptr<float>(), yp, K, n0, n1); break;
        case at::kBFloat16: int4_a8_rows(ql.data(), qh.data(), da.data(), zs.data(), pp, sz.data_ptr<c10::BFloat16>(), yp, K, n0, n1); break;
        case at::kHalf: int4_a8_rows(ql.data(), qh.data(), da.data(), zs.data(), pp, sz.data_ptr<c10::Half>(), yp, K, n0, n1); break;
        default: TORCH_CHECK(false, "scales_and_zeros must be float32, bfloat16 or float16");
      }
    });
  }
  return y;
#endif
}

}  // namespace

TORCH_LIBRARY(course_lib, m) {
  m.def("gemv_float(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("gemv_int4_a8(Tensor x, Tensor packed, Tensor scales_and_zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(course_lib, CPU, m) {
  m.impl("gemv_float", &gemv_float);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_int4_a8", &gemv_int4_a8);
}
