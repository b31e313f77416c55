// The log-sum-exp merge of partial attention results: splits s = 0..S-1 of each row r each hold a
// normalized partial O_s (float32) and its natural-log LSE_s, over disjoint sets of keys
// (core/params.cuh's CombineParams). The merged row is
//   LSE = m + log sum_s exp(LSE_s - m),   O = sum_s exp(LSE_s - LSE) O_s,   m = max_s LSE_s,
// written to out in the input dtype and to lse in float32. A split that saw no key has
// LSE_s = -inf and O_s = 0 and is left out of the sums (not weighted by 0: its O_s is never read);
// a row that no split saw a key for is fully masked: O = 0, LSE = -inf, never NaN. A NaN LSE_s
// (NaN scores) is weighted in and makes the row NaN.
//
// Serves the split-KV decode kernel (kernels/decode.cu) and any other producer of partials in
// this layout. One warp per row: lanes take the splits for the max and the sum, then the head-dim
// columns (coalesced) for the weighted sum.
//
// Configuration: DTYPE (1 float16, 2 bfloat16, 3 float32) of out.
#include "../core/elem.cuh"
#include "../core/params.cuh"

namespace cuflash {
namespace combine {

constexpr int kWarps = 4;  // rows per CTA
static_assert(!kIsF64, "the merge writes float32 LSE and 16-bit or float32 outputs");

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

}  // namespace combine
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::combine;

// Grid: ceil(rows / 4) CTAs of 4 warps; warp w of CTA c merges row 4c + w.
extern "C" __global__ void __launch_bounds__(kWarps * 32) lse_combine(const __grid_constant__ CombineParams p) {
    const int lane = threadIdx.x & 31;
    const i64 row = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const int h = static_cast<int>(row % p.heads);
    const i64 bt = row / p.heads;
    const int t = static_cast<int>(bt % p.seqlen_q);
    const i64 b = bt / p.seqlen_q;
    const float* const lse_s = p.lse_partial + row;
    const i64 split_stride = p.rows;  // between the LSEs of two splits; times head_dim_v between O_s

    constexpr float kLog2e = 1.4426950408889634f;
    float m = neg_inf();
    bool seen = false;
    for (int s = lane; s < p.splits; s += 32) {
        const float x = lse_s[s * split_stride];
        m = fmaxf(m, x);
        seen |= x != neg_inf();
    }
    m = warp_max(m);
    seen = __any_sync(0xffffffffu, seen);
    // Only NaN partials can leave m = -inf on a row some split saw; 0 keeps exp(LSE_s - m) defined.
    const float m_use = m == neg_inf() ? 0.f : m;
    float sum = 0.f;
    for (int s = lane; s < p.splits; s += 32) {
        const float x = lse_s[s * split_stride];
        if (x != neg_inf()) sum += exp2_approx((x - m_use) * kLog2e);
    }
    sum = warp_sum(sum);
    const float lse = seen ? m_use + 0.6931471805599453f * log2_approx(sum) : neg_inf();
    if (lane == 0) p.lse[b * p.lse_sb + h * p.lse_sh + t * p.lse_ss] = lse;

    char* const o_row = static_cast<char*>(p.out) + (b * p.o_st.b + t * p.o_st.s + h * p.o_st.h) * kElemBytes;
    const float* const o_s = p.o_partial + row * p.head_dim_v;
    const float inv_sum = seen ? 1.f / sum : 0.f;
    for (int d = lane; d < p.head_dim_v; d += 32) {
        float o = 0.f;
        for (int s = 0; s < p.splits; ++s) {
            const float x = lse_s[s * split_stride];
            if (x != neg_inf()) o += exp2_approx((x - m_use) * kLog2e) * o_s[s * split_stride * p.head_dim_v + d];
        }
        store_elem(o_row + d * p.o_st.d * kElemBytes, o * inv_sum);
    }
}
