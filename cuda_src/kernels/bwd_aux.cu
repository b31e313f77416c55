// The small memory-bound kernels around the backward's main kernels (flash_bwd.cu):
//   flash_bwd_preprocess  D_i = rowsum(dO_i o O_i) and L2_i = LSE_i * log2 e per query row, float32,
//                         (B, Hq, Sq_pad) contiguous; rows i >= Sq (padding) get D = 0, L2 = +inf,
//                         and so do rows with LSE = -inf (no visible key): exp2(s - L2) is then 0,
//                         never NaN, so such rows pass on no gradient.
//   flash_bwd_convert     out = scale * sum over `splits` float32 partials, in the output dtype and
//                         layout: the dQ workspace of the atomic path (padded rows and columns are
//                         skipped), and the GQA partial sums of dK/dV (added in split order, so the
//                         result is deterministic).
// DTYPE: 1 float16, 2 bfloat16, 3 float32 (the dtype of out, dO and the converted output).
#include "common.cuh"

#if !defined(DTYPE)
#error "flash_bwd_aux.cu needs DTYPE defined"
#endif

namespace cuflash {
namespace bwd_aux {

#if DTYPE == 1
using Elem = Half;
#elif DTYPE == 2
using Elem = BFloat16;
#elif DTYPE != 3
#error "DTYPE must be 1 (float16), 2 (bfloat16) or 3 (float32)"
#endif

__device__ __forceinline__ float load_elem(const char* p) {
#if DTYPE == 3
    return *reinterpret_cast<const float*>(p);
#else
    return to_float<Elem>(*reinterpret_cast<const u16*>(p));
#endif
}

__device__ __forceinline__ void store_elem(char* p, float x) {
#if DTYPE == 3
    *reinterpret_cast<float*>(p) = x;
#else
    *reinterpret_cast<u16*>(p) = from_float<Elem>(x);
#endif
}

constexpr int kElemBytes = DTYPE == 3 ? 4 : 2;
constexpr float kLog2e = 1.4426950408889634f;

}  // namespace bwd_aux
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::bwd_aux;

// One warp per query row (b, h, i) of the padded range; blockDim.x = 256. Strides in elements.
extern "C" __global__ void __launch_bounds__(256)
flash_bwd_preprocess(const void* __restrict__ out, const void* __restrict__ dout, const float* __restrict__ lse,
                     float* __restrict__ l2, float* __restrict__ dsum, i64 o_sb, i64 o_ss, i64 o_sh, i64 o_sd,
                     i64 do_sb, i64 do_ss, i64 do_sh, i64 do_sd, i64 lse_sb, i64 lse_sh, i64 lse_ss, int heads_q,
                     int seqlen_q, int seqlen_q_pad, int head_dim_v, i64 rows) {
    const int lane = threadIdx.x & 31;
    const i64 row = static_cast<i64>(blockIdx.x) * 8 + (threadIdx.x >> 5);
    if (row >= rows) return;
    const i64 bh = row / seqlen_q_pad;
    const int i = static_cast<int>(row - bh * seqlen_q_pad);
    const i64 b = bh / heads_q;
    const int h = static_cast<int>(bh - b * heads_q);
    float sum = 0.f, l2_row = __int_as_float(0x7f800000);  // +inf
    if (i < seqlen_q) {
        const char* o = static_cast<const char*>(out) + (b * o_sb + h * o_sh + static_cast<i64>(i) * o_ss) * kElemBytes;
        const char* d = static_cast<const char*>(dout) + (b * do_sb + h * do_sh + static_cast<i64>(i) * do_ss) * kElemBytes;
        for (int c = lane; c < head_dim_v; c += 32)
            sum += load_elem(o + c * o_sd * kElemBytes) * load_elem(d + c * do_sd * kElemBytes);
        const float lse_row = lse[b * lse_sb + h * lse_sh + static_cast<i64>(i) * lse_ss];
        if (lse_row != neg_inf()) l2_row = lse_row * kLog2e;
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) sum += shfl_xor(sum, m);
    if (lane == 0) {
        l2[row] = l2_row;
        dsum[row] = i < seqlen_q ? sum : 0.f;
    }
}

// One warp per row (b, h, s) of the workspace, lanes along c, so the float32 reads coalesce and
// the index arithmetic is paid once per row: dst[b, s, h, c] = scale * sum_split
// src[split * split_stride + (b * H + h) * src_sh + s * src_ss + c] for c < dim.
extern "C" __global__ void __launch_bounds__(256)
flash_bwd_convert(const float* __restrict__ src, i64 split_stride, i64 src_sh, i64 src_ss, int splits,
                  void* __restrict__ dst, i64 d_sb, i64 d_ss, i64 d_sh, i64 d_sd, int heads, int seqlen, int dim,
                  float scale, i64 rows) {
    const int lane = threadIdx.x & 31;
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
         row += warps) {
        const int s = static_cast<int>(row % seqlen);
        const i64 bh = row / seqlen;
        const int h = static_cast<int>(bh % heads);
        const i64 b = bh / heads;
        const float* p = src + bh * src_sh + static_cast<i64>(s) * src_ss;
        char* const q =
            static_cast<char*>(dst) + (b * d_sb + static_cast<i64>(s) * d_ss + static_cast<i64>(h) * d_sh) * kElemBytes;
        for (int c = lane; c < dim; c += 32) {
            float acc = 0.f;
            for (int sp = 0; sp < splits; ++sp) acc += p[sp * split_stride + c];
            store_elem(q + static_cast<i64>(c) * d_sd * kElemBytes, scale * acc);
        }
    }
}
