// Kernel parameters: one struct per pass, passed by value as a __grid_constant__ kernel argument.
//
// cuflash/_cuda/params.py mirrors these structs as NumPy structured dtypes and builds them on the
// host; every compile appends static_asserts (from that mirror) on sizeof and each field's offset,
// so a field added on one side only fails to compile. Adding a feature's parameters means adding
// fields here and in params.py. Strides are in elements and, like every offset built from them,
// 64-bit.
//
// Both structs are templates on Acc, the kernel's accumulator type (core/elem.cuh's Accum): the
// LSE, the score constants and the backward's workspaces have it. FwdParams and BwdParams (Acc =
// float) serve the 16-bit and float32 kernels, FwdParamsOf<double> and BwdParamsOf<double> the
// float64 ones; the pointer fields, and so the layout up to the score constants, are the same.
#pragma once

#include "ptx.cuh"

namespace cuflash {

// Strides of a (batch, sequence, head, head-dim) tensor.
struct Strides {
    i64 b, s, h, d;
};

// A window side that is not bounded (FlashAttention's -1): far beyond any sequence, yet
// i +- kUnbounded cannot overflow 64 bits.
constexpr i64 kUnbounded = i64(1) << 62;

// The forward pass; the backward reads the same fields for the same meaning.
template <typename Acc>
struct FwdParamsOf {
    const void* q;               // (B, Sq, Hq, D)
    const void* k;               // (B, Sk, Hkv, D)
    const void* v;               // (B, Sk, Hkv, Dv)
    void* out;                   // (B, Sq, Hq, Dv)
    Acc* lse;                    // (B, Hq, Sq), natural log; (Hq, total_q) packed
    const float* alibi_slopes;   // slope of (b, h) at alibi_slopes[b * alibi_sb + h]; null without ALiBi
    Strides q_st, k_st, v_st, o_st;
    i64 lse_sb, lse_sh, lse_ss;
    i64 alibi_sb;                // 0 for slopes of shape (Hq,)
    // Mask (attn/mask.cuh): query i sees key j iff j < Sk and
    // i + mask_offset - window_left <= j <= i + mask_offset + window_right; kUnbounded for no bound.
    i64 mask_offset, window_left, window_right;
    int batch, heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, head_dim_v;
    // Scores (attn/score_mod.cuh): logit2 = log2(e) * mod(scale * s).
    Acc scale;                   // scale (natural-log domain)
    Acc scale_log2;              // scale * log2 e
    Acc softcap_in;              // softcap: scale / c
    Acc softcap_out;             // softcap: c * log2 e
    int num_m_blocks;            // query tiles per (batch, head): the forward's grid is B * Hq * num_m_blocks
    int vec_out;                 // out rows 16-byte aligned with unit stride along Dv
    // Ragged batches (SEQ_MODE 1, attn/seqlen.cuh), each null when absent: packed offsets (B + 1)
    // and padded valid lengths (B). batch, seqlen_q and seqlen_k then describe the grid (seqlen_*
    // the longest sequence, or the padded length), and the mask of sequence b is aligned
    // bottom-right (offset Sk_b - Sq_b) if mask_bottom_right, else top-left (offset 0).
    const int* cu_seqlens_q;
    const int* cu_seqlens_k;
    const int* seqused_q;
    const int* seqused_k;
    int mask_bottom_right;
};

using FwdParams = FwdParamsOf<float>;

// The backward pass: the forward's problem (q, k, v, out, lse as the forward saw them) and the
// gradients' operands and workspaces.
template <typename Acc>
struct BwdParamsOf {
    FwdParamsOf<Acc> fwd;
    const void* dout;            // (B, Sq, Hq, Dv)
    Acc* l2;                     // (B, Hq, Sq_pad): LSE * log2 e, +inf on rows that see no key and past Sq
                                 // (packed: attn/seqlen.cuh's ws_row0 places the rows)
    Acc* dsum;                   // (B, Hq, Sq_pad): D = rowsum(dO o O), 0 past Sq
    Acc* dq_accum;               // (B, Hq, Sq_pad, HEAD_DIM) Acc workspace of the atomic dQ
    void* dq;                    // (B, Sq, Hq, D)
    void* dk;                    // (B, Sk, Hkv, D), or Acc partial sums (splits, B, Hkv, Sk, D)
    void* dv;                    // (B, Sk, Hkv, Dv), or Acc partial sums as dk
    Strides do_st, dq_st, dk_st, dv_st;
    i64 dk_split, dv_split;      // elements between the partial sums of two GQA splits
    int seqlen_q_pad;            // Sq rounded up to a multiple of 128 (rows of l2, dsum, dq_accum per (b, h));
                                 // packed: total_q + 128 * B (rows per head)
    int heads_per_split;         // query heads of a GQA group per dK/dV CTA
    int splits;                  // CTAs sharing one key tile's GQA group
    int n_tiles;                 // tiles the grid's fastest index runs over
    int vec_in;                  // q, k, v, dout rows 16-byte aligned with unit stride along the head dim
    int f32_out;                 // dK/dV go to Acc partial sums (splits > 1)
};

using BwdParams = BwdParamsOf<float>;

// Decoding against a key/value cache (kernels/decode.cu): q (B, Sq, Hq, D) against the first
// cache_seqlens[b] + seqlen_new keys of sequence b. fwd describes the problem as the forward does,
// with k and v the caches: dense, (B, S_cache, Hkv, .) with k_st.b between sequences, or paged,
// (num_pages, page_size, Hkv, .) with k_st.b between pages and the pages of sequence b listed in
// block_table[b * table_stride + n]. fwd.seqlen_k and fwd.mask_offset are unused: each sequence's
// key count comes from cache_seqlens, and its mask is aligned bottom-right with that count.
struct DecodeParams {
    FwdParams fwd;
    const int* cache_seqlens;    // (B,) keys in each sequence's cache before the append
    const int* block_table;      // (B, max_pages) page indices; null for a dense cache
    float* o_partial;            // (splits, B * Sq * Hq, Dv) normalized partial O of each split
    float* lse_partial;          // (splits, B * Sq * Hq) natural-log LSE of each split; -inf: no key
    i64 table_stride;            // elements between rows of block_table
    i64 num_pages;               // pages of a paged cache: a page index is clamped into 0..num_pages-1
    int seqlen_new;              // S_new: keys appended to every sequence (already in the cache)
    int page_size;               // keys per page (paged)
    int splits;                  // CTAs sharing one (batch, kv head, row tile); 1: out, lse written directly
    int row_tiles;               // tiles of packed query rows (t, g) per (batch, kv head)
    int capacity;                // keys one sequence's cache holds: Sk_b is clamped into 0..capacity
};

// Log-sum-exp merge of partial results (kernels/combine.cu). Row r = (b * Sq + t) * H + h of
// every split s holds a normalized partial O at o_partial[(s * rows + r) * head_dim_v + .] and
// its natural-log LSE at lse_partial[s * rows + r] (-inf with O = 0 where the split saw no key);
// the merge goes to out (B, Sq, H, Dv) and lse (B, H, Sq).
struct CombineParams {
    const float* o_partial;
    const float* lse_partial;
    void* out;
    float* lse;
    Strides o_st;
    i64 lse_sb, lse_sh, lse_ss;
    i64 rows;                    // B * Sq * H
    int seqlen_q, heads, head_dim_v, splits;
};

// Appending k_new, v_new (B, S_new, Hkv, D / Dv) into a cache (kernels/append.cu) at positions
// cache_seqlens[b] + t, dense or paged as in DecodeParams.
struct AppendParams {
    const void* k_new;
    const void* v_new;
    void* k_cache;
    void* v_cache;
    const int* cache_seqlens;
    const int* block_table;      // null for a dense cache
    Strides kn_st, vn_st, kc_st, vc_st;
    i64 table_stride;
    i64 num_pages;               // as DecodeParams: positions and pages outside the cache are not written
    int batch, seqlen_new, heads_kv, head_dim, head_dim_v, page_size;
    int capacity;
};

// A tensor map (the driver's CUtensorMap): 128 opaque bytes, 64-byte aligned, encoded on the host by
// cuTensorMapEncodeTiled (cuflash/_cuda/tensor_map.py) and read by TMA copies (core/tma.cuh).
struct alignas(64) TensorMap {
    unsigned long long bytes[16];
};

// The sm_90a forward (kernels/fwd_sm90.cu): the forward's problem, and tensor maps of q, k and v
// as rank-4 tensors, innermost first (head dim, sequence, head, batch), with their strides.
struct FwdSm90Params {
    FwdParams fwd;
    TensorMap q_map, k_map, v_map;
};

}  // namespace cuflash
