// Where sequence b of a batch lies and how long it is: the one place that turns (params, b) into
// its rows and its lengths Sq_b, Sk_b (FlashAttention-2's scheme).
//
// SEQ_MODE, a define from the variant table (cuflash/_cuda/variants.py), picks the code:
//   0  dense: every sequence has p.seqlen_q queries and p.seqlen_k keys at batch index b of BSHD
//      tensors; nothing here reads memory.
//   1  ragged: FwdParams' optional int32 device arrays (null: absent) give each sequence's place:
//        cu_seqlens_q/k (B + 1)  packed: sequence b is rows cu[b] .. cu[b + 1] of (total, H, .)
//                                tensors (batch stride 0), and of lse (Hq, total_q);
//        seqused_q/k (B)         padded: sequence b is the first seqused[b] rows of batch element b.
//      Without either, a side has p.seqlen_q (p.seqlen_k) rows per batch element, as when dense.
// Every kernel builds its Mask from these lengths (Mask::of(p, seq), attn/mask.cuh), so visibility
// is still decided in one place; a CTA whose tile starts past Sq_b (Sk_b for key tiles) has
// nothing to do. Kernels write only the rows of sequences: the padding of a padded batch is filled
// by the launcher (out = 0, lse = -inf, dq = dk = dv = 0).
#pragma once

#include "../core/params.cuh"

#ifndef SEQ_MODE
// Kernels outside the variant table's attention kernels (decode, the mask test harness) are dense.
#define SEQ_MODE 0
#endif

namespace cuflash {

static_assert(SEQ_MODE == 0 || SEQ_MODE == 1, "SEQ_MODE is 0 (dense) or 1 (ragged)");
constexpr bool kRagged = SEQ_MODE == 1;

// Rows a packed sequence owns in the backward's per-row workspaces beyond its Sq_b rows: a
// streamed query tile (at most 128 rows, starting below Sq_b) never reads into the next sequence.
// cuflash/_cuda/backward.py's _ROW_PAD.
constexpr int kWsRowPad = 128;

struct Seq {
    // First row of sequence b in q, out, lse, dO, dq (k, v, dk, dv): cu_seqlens[b], or 0. An int
    // like the offsets themselves (products with strides are 64-bit): two registers fewer to hold
    // across the backward's loops, whose 16-bit dK/dV kernels have none to spare.
    int q0, k0;
    int seqlen_q, seqlen_k;  // Sq_b, Sk_b

    // Ragged = false: the dense lengths, nothing read. The aux kernels take Ragged = true in one
    // instantiation for every problem (null pointers give the dense answer).
    template <bool Ragged = kRagged, typename Params>
    __device__ __forceinline__ static Seq of(const Params& f, i64 b) {
        if constexpr (!Ragged) {
            return Seq{0, 0, f.seqlen_q, f.seqlen_k};
        } else {
            Seq s;
            s.q0 = f.cu_seqlens_q != nullptr ? f.cu_seqlens_q[b] : 0;
            s.k0 = f.cu_seqlens_k != nullptr ? f.cu_seqlens_k[b] : 0;
            s.seqlen_q = f.seqused_q != nullptr      ? f.seqused_q[b]
                         : f.cu_seqlens_q != nullptr ? f.cu_seqlens_q[b + 1] - s.q0
                                                     : f.seqlen_q;
            s.seqlen_k = f.seqused_k != nullptr      ? f.seqused_k[b]
                         : f.cu_seqlens_k != nullptr ? f.cu_seqlens_k[b + 1] - s.k0
                                                     : f.seqlen_k;
            return s;
        }
    }
};

// Row 0 of (b, h) in the backward's per-row workspaces (l2, dsum; dq_accum has HEAD_DIM columns per
// row): (B, Hq, Sq_pad) unless packed; packed, (Hq, seqlen_q_pad = total_q + kWsRowPad * B) with
// sequence b from row cu_seqlens_q[b] + kWsRowPad * b, so that it owns Sq_b + kWsRowPad rows
// whatever the other sequences' lengths (a (B, Hq, max Sq_b) layout would grow with the longest).
// Those starts are not multiples of 4 rows, so ragged kernels read L2 and D element by element
// (attn/schedule.cuh's load_query_step), never in 16-byte chunks.
template <bool Ragged = kRagged, typename Params>
__device__ __forceinline__ i64 ws_row0(const Params& p, const Seq& s, i64 b, int h) {
    if constexpr (Ragged) {
        if (p.fwd.cu_seqlens_q != nullptr) return h * static_cast<i64>(p.seqlen_q_pad) + s.q0 + kWsRowPad * b;
    }
    return (b * p.fwd.heads_q + h) * static_cast<i64>(p.seqlen_q_pad);
}

// The packed sequence holding row r of a workspace head, or (offsets = cu_seqlens_q) query row r of
// a packed tensor: the last b in [0, B) with offsets[b] + pad * b <= r (empty sequences before a
// longer one share its start; the last of them is the one holding r).
__device__ __forceinline__ int packed_seq_of(const int* cu_seqlens, int batch, i64 r, int pad) {
    int lo = 0, hi = batch;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu_seqlens[mid] + static_cast<i64>(pad) * mid <= r) lo = mid; else hi = mid;
    }
    return lo;
}

}  // namespace cuflash
