// Score modifiers: the one place that turns a raw score s = q_i . k_j into a logit and
// back-propagates through it; the CUDA counterpart of cuflash/_score_mod.py.
//
// Logits live in the log2 domain: logit2 = log2(e) * mod(scale * s), so P = exp2(logit2 - m) in the
// forward and exp2(logit2 - L2) in the backward. SCORE_MODS (a define of the variant) is a set of bits:
//   1 softcap  mod(x) = c * tanh(x / c)               d mod / dx = 1 - tanh^2(x / c)
//   2 ALiBi    mod(x) = x - slope * |i + offset - j|   d mod / dx = 1
// applied in that order (FlashAttention's). With no bit set the kernels may fold the scale into
// their exp2 (see fwd_sm80.cu); with any set, every tile computes logits first.
// ScoreModOf<T> computes in the accumulator type T (core/accum.cuh): ScoreMod (float) for the 16-bit
// and float32 kernels, ScoreModOf<double> for float64, from the FwdParamsOf<T> of the kernel.
#pragma once

#include "../core/accum.cuh"
#include "../core/params.cuh"

#if !defined(SCORE_MODS)
#error "kernels need SCORE_MODS defined (bits: 1 softcap, 2 ALiBi)"
#endif

namespace cuflash {

constexpr bool kSoftcap = (SCORE_MODS & 1) != 0;
constexpr bool kAlibi = (SCORE_MODS & 2) != 0;
constexpr bool kScoreMods = SCORE_MODS != 0;
static_assert(SCORE_MODS >= 0 && SCORE_MODS <= 3, "SCORE_MODS bits: 1 softcap, 2 ALiBi");

template <typename T>
struct ScoreModOf {
    using M = Num<T>;
    T scale_log2;   // identity and ALiBi: logit2 = s * scale * log2 e
    T cap_in;       // softcap: scale / c
    T cap_out;      // softcap: c * log2 e
    T cap_out_inv;  // softcap: 1 / cap_out
    T slope_log2;   // ALiBi: slope of this (batch, head) * log2 e (the slopes are float32 in memory)

    __device__ __forceinline__ static ScoreModOf of(const FwdParamsOf<T>& p, i64 b, int h) {
        ScoreModOf m{p.scale_log2, p.softcap_in, p.softcap_out, kSoftcap ? T(1) / p.softcap_out : T(0), T(0)};
        if constexpr (kAlibi) m.slope_log2 = p.alibi_slopes[b * p.alibi_sb + h] * static_cast<T>(1.4426950408889634);
        return m;
    }

    // The logit (log2 domain) of raw score s at distance dist = i + offset - j (read only with ALiBi;
    // exact as a float up to 2^24, as a double up to 2^53).
    __device__ __forceinline__ T logit2(T s, T dist) const {
        T x;
        if constexpr (kSoftcap) x = cap_out * M::tanh(s * cap_in);
        else x = s * scale_log2;
        if constexpr (kAlibi) x = M::fma(-slope_log2, M::abs(dist), x);
        return x;
    }

    // d mod / d(scale * s) of an element whose probability is p = exp2(logit2 - l2). The softcap's
    // tanh is recovered from p rather than kept from the forward pass over the tile (that would hold
    // a second score tile in registers): logit2 = log2 p + l2, tanh = (logit2 - alibi) / cap_out.
    // An element with p = 0 contributes nothing, whatever this returns; 0 keeps it finite.
    __device__ __forceinline__ T dlogit(T p, T l2, T dist) const {
        if constexpr (!kSoftcap) {
            return T(1);
        } else {
            T x = M::log2(p) + l2;
            if constexpr (kAlibi) x = M::fma(slope_log2, M::abs(dist), x);
            const T t = x * cap_out_inv;
            return p > T(0) ? T(1) - t * t : T(0);
        }
    }
};

using ScoreMod = ScoreModOf<float>;

}  // namespace cuflash
