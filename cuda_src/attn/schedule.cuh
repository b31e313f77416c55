// Which work a CTA does: blockIdx -> (batch, head, tile), with the tile ranges the mask allows.
#pragma once

#include "../core/tile_io.cuh"
#include "mask.cuh"

namespace cuflash {

// The work of one dK/dV CTA. Grid: blockIdx.x = ((b * Hkv + h_kv) * splits + split) * n_tiles + key
// tile, so B*H is not bound by gridDim.y/z limits and the CTAs of one head (sharing its Q and dO in
// L2) run together. The CTA owns keys [key0, key0 + BlockN) of key/value head h_kv and streams the
// query tiles m in [m_begin, m_end) that those keys need (Mask::query_tiles) of the query heads h in
// [h_begin, h_end) of its share of the GQA group: n_iter steps (h, m), tiles fastest.
struct KvStep {
    int h, m;
};

struct KvWork {
    i64 b;
    int split, h_kv, key0, h_begin, h_end, m_begin, m_end, n_iter;

    __device__ __forceinline__ KvStep first() const { return KvStep{h_begin, m_begin}; }
    __device__ __forceinline__ KvStep next(KvStep x) const {
        return x.m + 1 < m_end ? KvStep{x.h, x.m + 1} : KvStep{x.h + 1, m_begin};
    }
};

// The batch index (sequence) of a dK/dV CTA, needed before its mask (Mask::of(p, seq)).
template <typename Params>
__device__ __forceinline__ i64 kv_batch(const Params& p) {
    return blockIdx.x / p.n_tiles / p.splits / p.fwd.heads_kv;
}

// mask: the mask of the CTA's sequence (Mask::of(p.fwd, seq) of sequence kv_batch(p)).
template <int BlockN, int BlockM, typename Params>
__device__ __forceinline__ KvWork kv_work(const Params& p, const Mask& mask) {
    KvWork w;
    const int tile = static_cast<int>(blockIdx.x % p.n_tiles);
    i64 rest = blockIdx.x / p.n_tiles;
    w.split = static_cast<int>(rest % p.splits);
    rest /= p.splits;
    w.h_kv = static_cast<int>(rest % p.fwd.heads_kv);
    w.b = rest / p.fwd.heads_kv;
    w.key0 = tile * BlockN;
    const int group = p.fwd.group;
    w.h_begin = w.h_kv * group + w.split * p.heads_per_split;
    const int h_stop = w.h_kv * group + group;
    w.h_end = w.h_begin + p.heads_per_split < h_stop ? w.h_begin + p.heads_per_split : h_stop;
    const int key1 = w.key0 + BlockN < mask.seqlen_k ? w.key0 + BlockN : mask.seqlen_k;
    const TileRange m = mask.query_tiles<BlockM>(w.key0, key1);
    w.m_begin = m.begin;
    w.m_end = m.end;
    w.n_iter = m.count() * (w.h_end > w.h_begin ? w.h_end - w.h_begin : 0);
    return w;
}

// Loads the query tile of step x of a dK/dV CTA: Q_i and dO_i through the kernel's tile loader
// (load_rows(smem, tensor, row0, ncols), which knows the kernel's shared-memory layout), and the
// tile's L2 and D rows (BlockM values each, in the accumulator type of Params, a BwdParamsOf<Acc>)
// of sequence b (seq, attn/seqlen.cuh).
template <int BlockM, int Threads, int ElemBytes, typename Params, typename LoadRows>
__device__ __forceinline__ void load_query_step(const Params& p, const Seq& seq, i64 b, KvStep x, u32 sQ, u32 sdO,
                                                u32 sL2, u32 sD, int tid, LoadRows load_rows) {
    const auto& f = p.fwd;
    const int i0 = x.m * BlockM;
    load_rows(sQ, Tensor::of(f.q, f.q_st, b, x.h, ElemBytes, seq.q0), i0, f.head_dim);
    load_rows(sdO, Tensor::of(p.dout, p.do_st, b, x.h, ElemBytes, seq.q0), i0, f.head_dim_v);
    // A packed sequence's workspace rows start wherever the sequences before it end (ws_row0), so
    // ragged variants copy L2 and D element by element rather than in 16-byte chunks.
    const i64 off = ws_row0(p, seq, b, x.h) + i0;
    load_vec<BlockM, Threads, !kRagged>(sL2, p.l2 + off, tid);
    load_vec<BlockM, Threads, !kRagged>(sD, p.dsum + off, tid);
}

// The query tile of a forward or dQ CTA. Grid: blockIdx.x = (b * Hq + h) * n_tiles + (n_tiles - 1 -
// tile): the CTAs of one head run together (K/V stay in L2), and with a causal mask the longest
// rows start first.
struct QWork {
    i64 b;
    int h, h_kv, tile;
};

__device__ __forceinline__ QWork q_work(int n_tiles, int heads_q, int group) {
    QWork w;
    const i64 bh = blockIdx.x / n_tiles;
    w.tile = n_tiles - 1 - static_cast<int>(blockIdx.x - bh * n_tiles);
    w.b = bh / heads_q;
    w.h = static_cast<int>(bh - w.b * heads_q);
    w.h_kv = w.h / group;
    return w;
}

}  // namespace cuflash
