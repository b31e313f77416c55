// The softmax pieces of the kernels: the forward's online-softmax state (FlashAttention-2's
// m_i, l_i with rescale and finalize) and the backward's recomputation of P from the LSE.
#pragma once

#include "../core/ptx.cuh"

namespace cuflash {

// Online-softmax state of this thread's two rows (g and g + 8) in each m16 fragment, in the log2
// domain: m_i is the reference max of scale*log2(e)*S, l_i the running sum of exp2(s - m_i) over
// this thread's columns only (the quad's four partial sums are added once, in finalize).
//
// m_i moves only when some row of the warp finds a max more than kRescaleSlack above it: until then
// P = exp2(s - m_i) <= 2^kRescaleSlack, exact in f32 and as precise in f16/bf16 as any value, and
// O_i, l_i skip their rescale. Both are relative to the same m_i, so O_i / l_i and LSE stay exact.
constexpr float kRescaleSlack = 8.f;

template <int kMTiles, int kNTiles, int kDTiles>
struct SoftmaxState {
    float m[kMTiles][2];
    float l[kMTiles][2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m[mt][h] = neg_inf();
                l[mt][h] = 0.f;
            }
    }

    // Turns the scores into P = exp2(c * s - m_i) in place (c = scale * log2 e), first moving m_i
    // (and rescaling O_i and l_i) if the warp needs it. SCALED: s already holds c * S with masked
    // entries at -inf (tiles that need a mask); otherwise s is the raw S of an unmasked tile, the
    // row max is c * max S (c * min S for c < 0) and the scaling rides in the exp2's FFMA.
    // A row that has seen only masked keys keeps m = -inf and subtracts 0 instead, since
    // -inf - (-inf) would be NaN: its P and alpha are then exp2(-inf) = 0, so O_i and l_i stay 0.
    template <bool SCALED>
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc_o)[kMTiles][kDTiles][4],
                                           float c) {
        float mx[kMTiles][2];
        bool grow = false;
        const bool negate = !SCALED && c < 0.f;  // warp-uniform
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x;
                if (negate) {
                    x = __int_as_float(0x7f800000);
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = fminf(x, fminf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = -quad_max(-x);
                } else {
                    x = neg_inf();
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = fmaxf(x, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = quad_max(x);
                }
                mx[mt][h] = SCALED ? x : c * x;
                grow |= mx[mt][h] > m[mt][h] + kRescaleSlack;
            }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float m_new = fmaxf(m[mt][h], mx[mt][h]);
                    const float alpha = exp2_approx(m[mt][h] - (m_new == neg_inf() ? 0.f : m_new));
                    m[mt][h] = m_new;
                    l[mt][h] *= alpha;
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
                const float m_use = m[mt][h] == neg_inf() ? 0.f : m[mt][h];
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = exp2_approx(SCALED ? s[mt][nt][e] - m_use : fmaf(s[mt][nt][e], c, -m_use));
                        sum += s[mt][nt][e];
                    }
                l[mt][h] += sum;
            }
    }
};

// The backward's P_ij = exp(logit_ij - LSE_i), with both in the log2 domain (L2 = LSE * log2 e,
// +inf on rows that see no key, so P = 0 there rather than NaN).
__device__ __forceinline__ float p_from_lse(float logit2, float l2) { return exp2_approx(logit2 - l2); }

}  // namespace cuflash
