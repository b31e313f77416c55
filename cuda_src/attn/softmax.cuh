// The softmax pieces of the kernels: the forward's online-softmax state (FlashAttention-2's
// m_i, l_i with rescale and finalize) and the backward's recomputation of P from the LSE.
#pragma once

#include "../core/accum.cuh"

namespace cuflash {

// Online-softmax state of this thread's two rows (g and g + 8) in each m16 fragment, in the log2
// domain: m_i is the reference max of scale*log2(e)*S, l_i the running sum of exp2(s - m_i) over
// this thread's columns only (the quad's four partial sums are added once, in finalize).
//
// m_i moves only when some row of the warp finds a max more than kRescaleSlack above it: until then
// P = exp2(s - m_i) <= 2^kRescaleSlack, exact in f32 and as precise in f16/bf16 as any value, and
// O_i, l_i skip their rescale. Both are relative to the same m_i, so O_i / l_i and LSE stay exact.
//
// T is the accumulator type: float, or double in the float64 kernels, whose m16 x n8 tiles of
// doubles (two stacked m8n8k4 accumulators, core/dmma.cuh) have the same element order.
//
// kCompensatedL: l_i is a compensated (Kahan) sum, its running error in lc (rescaled with l_i). The
// float32 forward needs it: one float32 add per key tile over a long Sk otherwise costs a few times
// naive float32's error (bench/emulate_float32.py); 16-bit outputs cannot see the difference.
constexpr float kRescaleSlack = 8.f;

template <int kMTiles, int kNTiles, int kDTiles, typename T = float, bool kCompensatedL = false>
struct SoftmaxState {
    using M = Num<T>;
    T m[kMTiles][2];
    T l[kMTiles][2];
    T lc[kCompensatedL ? kMTiles : 1][2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m[mt][h] = M::neg_inf();
                l[mt][h] = T(0);
                if constexpr (kCompensatedL) lc[mt][h] = T(0);
            }
    }

    // This lane's share of row (mt, h)'s sum (the quad's four shares are added in finalize).
    __device__ __forceinline__ T lane_sum(int mt, int h) const {
        if constexpr (kCompensatedL) return l[mt][h] - lc[mt][h];
        return l[mt][h];
    }

    // Turns the scores into P = exp2(c * s - m_i) in place (c = scale * log2 e), first moving m_i
    // (and rescaling O_i and l_i) if the warp needs it. SCALED: s already holds c * S with masked
    // entries at -inf (tiles that need a mask); otherwise s is the raw S of an unmasked tile, the
    // row max is c * max S (c * min S for c < 0) and the scaling rides in the exp2's FFMA.
    // A row that has seen only masked keys keeps m = -inf and subtracts 0 instead, since
    // -inf - (-inf) would be NaN: its P and alpha are then exp2(-inf) = 0, so O_i and l_i stay 0.
    template <bool SCALED>
    __device__ __forceinline__ void update(T (&s)[kMTiles][kNTiles][4], T (&acc_o)[kMTiles][kDTiles][4], T c) {
        T mx[kMTiles][2];
        bool grow = false;
        const bool negate = !SCALED && c < T(0);  // warp-uniform
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                T x;
                if (negate) {
                    x = M::inf();
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = M::min(x, M::min(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = -M::quad_max(-x);
                } else {
                    x = M::neg_inf();
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = M::max(x, M::max(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = M::quad_max(x);
                }
                mx[mt][h] = SCALED ? x : c * x;
                grow |= mx[mt][h] > m[mt][h] + kRescaleSlack;
            }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const T m_new = M::max(m[mt][h], mx[mt][h]);
                    const T alpha = M::exp2(m[mt][h] - (m_new == M::neg_inf() ? T(0) : m_new));
                    m[mt][h] = m_new;
                    l[mt][h] *= alpha;
                    if constexpr (kCompensatedL) lc[mt][h] *= alpha;
#pragma unroll
                    for (int dt = 0; dt < kDTiles; ++dt) {
                        acc_o[mt][dt][2 * h] *= alpha;
                        acc_o[mt][dt][2 * h + 1] *= alpha;
                    }
                }
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const T m_use = m[mt][h] == M::neg_inf() ? T(0) : m[mt][h];
                T sum = T(0);
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = M::exp2(SCALED ? s[mt][nt][e] - m_use : M::fma(s[mt][nt][e], c, -m_use));
                        sum += s[mt][nt][e];
                    }
                if constexpr (kCompensatedL) {
                    const T y = sum - lc[mt][h];
                    const T t = l[mt][h] + y;
                    lc[mt][h] = (t - l[mt][h]) - y;
                    l[mt][h] = t;
                } else {
                    l[mt][h] += sum;
                }
            }
    }
};

// The backward's P_ij = exp(logit_ij - LSE_i), with both in the log2 domain (L2 = LSE * log2 e,
// +inf on rows that see no key, so P = 0 there rather than NaN).
__device__ __forceinline__ float p_from_lse(float logit2, float l2) { return exp2_approx(logit2 - l2); }
__device__ __forceinline__ double p_from_lse(double logit2, double l2) { return Num<double>::exp2(logit2 - l2); }

}  // namespace cuflash
