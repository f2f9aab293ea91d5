"""Hand-written CPU kernel of the reverse KL over the whole vocabulary (TP = 1, fp32).

Why not torch.compile alone: inductor's code for the fused chunk runs at ~2.6 ns per logit and core,
the C++ loop below at ~0.8 (benchmarks/README.md). Per selected row it makes three passes: the row
maxima; the exponentials and sums, writing e into the gradient row and d into a row buffer while the
next row is prefetched into L2 (so the maxima pass of the next row reads cache, and memory traffic
overlaps the arithmetic); the gradient, in place. Two exponentials per logit, each logit read once
from memory, one parallel region for all rows: no chunk loop, no temporaries. The math is that of
``VocabParallelKernels.reverse_kl_*`` (which covers every other case), with 1/T as a product.

Built on first use with inductor's C++ toolchain (``CppCodeCache``: the compiler, flags, OpenMP runtime
and cache directory of torch.compile's own CPU kernels), so it needs what torch.compile needs.
"""

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from megatron_minillm.losses.kernels import compilation

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

namespace {

constexpr int64_t W = 16;  // floats per vector: one AVX-512 register, two AVX2 or four NEON ones
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
constexpr int64_t kBlock = 64 * W;  // floats summed per lane before they join the row's sums
constexpr float kLowest = std::numeric_limits<float>::lowest();

template <class To, class From>
inline To bit_cast(const From& x) { To y; std::memcpy(&y, &x, sizeof y); return y; }
inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// The first n floats at p; the other lanes hold the lowest float (which contributes nothing below).
inline vf load(const float* p, int64_t n = W) {
  vf v = splat(kLowest);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void store(float* p, vf v, int64_t n = W) { std::memcpy(p, &v, n * sizeof(float)); }
inline float hsum(vf v) { float s = 0; for (int64_t i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float m = v[0]; for (int64_t i = 1; i < W; ++i) m = m > v[i] ? m : v[i]; return m; }

// 2^v for v <= 0: a degree-5 minimax polynomial of 2^f on [-1/2, 1/2] (relative error < 3e-7 in
// fp32) times 2^n; exactly 0 for v <= -127, -inf included; NaN stays NaN.
inline vf exp2_nonpositive(vf v) {
  const vf vc = -127.0f > v ? splat(-127.0f) : v;  // n = -127 makes the exponent field, and the result, 0
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  const vf r = vc + magic;
  const vf f = vc - (r - magic);
  vf p = splat(1.3276471e-3f);
  for (float c : {9.6755410e-3f, 5.5507131e-2f, 2.4022120e-1f, 6.9314694e-1f, 1.0000001f}) p = p * f + c;
  return p * bit_cast<vf>((bit_cast<vi>(r) - bit_cast<vi>(splat(magic)) + 127) << 23);
}

}  // namespace

// For each selected row r = rows[i] of z and t (first num_valid of width columns; the rest is padding):
// stats[0, i] = S_q, stats[1, i] = S_p, stats[2, i] = A, and, unless grad is null, the row of
// weights[i] dKL/dz = weights[i] e / S_q (d - A / S_q) / T (0 in padded columns). Notation of kernels.py.
extern "C" void reverse_kl_rows(const float* z, const float* t, float* grad, const int64_t* rows,
                                const float* weights, float* stats, int64_t n, int64_t num_valid, int64_t width,
                                int64_t ldz, int64_t ldt, int64_t ldg, float inv_t, int32_t threads) {
  const float log2e = 1.4426950408889634f;
  const int64_t full = num_valid / W * W, tail = num_valid - full;
  #pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<float[]> d_row(new float[full + W]);
    float* d = d_row.get();
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* x = z + rows[i] * ldz;
      const float* y = t + rows[i] * ldt;
      float* g = grad ? grad + rows[i] * ldg : nullptr;
      vf mx = splat(kLowest), my = splat(kLowest);
      for (int64_t j = 0; j < full; j += W) { mx = vmax(mx, load(x + j)); my = vmax(my, load(y + j)); }
      if (tail) { mx = vmax(mx, load(x + full, tail)); my = vmax(my, load(y + full, tail)); }
      // The row maxima of the clamped z/T and t/T (T > 0 keeps the order); a shift of 0 for a row with nothing.
      const float max_x = std::max(hmax(mx) * inv_t, kLowest), max_y = std::max(hmax(my) * inv_t, kLowest);
      const vf lowest = splat(kLowest);
      const vf shift_x = splat(max_x > kLowest ? max_x : 0.0f), shift_y = splat(max_y > kLowest ? max_y : 0.0f);
      vf s_q = {}, s_p = {}, a = {};  // sums of the blocks' sums: fp32 error grows with the block count
      vf block_q, block_p, block_a;
      auto sums = [&](int64_t j, int64_t count) {
        const vf u = load(x + j, count) * inv_t - shift_x;
        const vf w = load(y + j, count) * inv_t - shift_y;
        const vf e = exp2_nonpositive(u * log2e);  // 0 where z = -inf
        const vf u_w = u - w;
        const vf dj = u_w > lowest ? u_w : lowest;  // -inf and NaN (-inf - -inf) where e = 0: finite
        block_q += e;
        block_p += exp2_nonpositive(w * log2e);
        block_a += e * dj;
        store(d + j, dj);
        if (g) store(g + j, e, count);
      };
      const bool prefetch = i + 1 < n;
      const float* next_x = z + (prefetch ? rows[i + 1] : rows[i]) * ldz;
      const float* next_y = t + (prefetch ? rows[i + 1] : rows[i]) * ldt;
      for (int64_t block = 0; block < num_valid; block += kBlock) {
        block_q = block_p = block_a = vf{};
        for (int64_t j = block; j < block + kBlock && j < full; j += W) {
          if (prefetch) { __builtin_prefetch(next_x + j, 0, 2); __builtin_prefetch(next_y + j, 0, 2); }
          sums(j, W);
        }
        if (tail && block + kBlock > full) sums(full, tail);
        s_q += block_q; s_p += block_p; a += block_a;
      }
      const float total_q = hsum(s_q), total_a = hsum(a);
      stats[i] = total_q;
      stats[n + i] = hsum(s_p);
      stats[2 * n + i] = total_a;
      if (!g) continue;
      const float inv = total_q > 0 ? 1.0f / total_q : 0.0f;
      const vf scale = splat(inv * inv_t * weights[i]), mean_d = splat(total_a * inv);
      // (e * scale) first: d - mean_d is near the lowest float where e = 0 (masked entries).
      for (int64_t j = 0; j < full; j += W) store(g + j, (load(g + j) * scale) * (load(d + j) - mean_d));
      if (tail) store(g + full, (load(g + full, tail) * scale) * (load(d + full) - mean_d), tail);
      if (width > num_valid) std::memset(g + num_valid, 0, (width - num_valid) * sizeof(float));
    }
  }
}
"""


@functools.cache
def _kernel() -> Callable | None:
    """The compiled kernel, or None once compiling has failed (then the caller runs other kernels)."""
    if compilation.failed:
        return None
    try:
        from torch._inductor.codecache import CppCodeCache

        library = CppCodeCache.load(_SOURCE, device_type="cpu", extra_flags=("-ffp-contract=fast",))
    except (ImportError, OSError, RuntimeError) as error:  # inductor's InvalidCxxCompiler, CppCompileError
        compilation.give_up(error)
        return None
    kernel = library.reverse_kl_rows
    kernel.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int32]
    kernel.restype = None
    return kernel


def supports(student: Tensor, teacher: Tensor) -> bool:
    """fp32 CPU logits [tokens, V] with contiguous rows."""
    return (
        student.device.type == "cpu"
        and student.dtype == teacher.dtype == torch.float32
        and student.stride(-1) == teacher.stride(-1) == 1
    )


def reverse_kl_rows(
    student: Tensor,
    teacher: Tensor,
    rows: Tensor,
    weights: Tensor,
    num_valid: int,
    temperature: float,
    grad: Tensor | None,
) -> Tensor | None:
    """The full-vocabulary sums [3, n] (S_q, S_p, A) of the selected ``rows`` of ``student`` and ``teacher``
    [tokens, V] (``supports``), and weights * dKL/dz into those rows of ``grad`` unless it is None; None
    if the kernel could not be built."""
    kernel = _kernel()
    if kernel is None:
        return None
    rows, weights = rows.contiguous(), weights.contiguous()
    stats = student.new_empty(3, len(rows))
    kernel(
        student.data_ptr(),
        teacher.data_ptr(),
        None if grad is None else grad.data_ptr(),
        rows.data_ptr(),
        weights.data_ptr(),
        stats.data_ptr(),
        len(rows),
        num_valid,
        student.shape[-1],
        student.stride(0),
        teacher.stride(0),
        0 if grad is None else grad.stride(0),
        1.0 / temperature,
        torch.get_num_threads(),
    )
    return stats
