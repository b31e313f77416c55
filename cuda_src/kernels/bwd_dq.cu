// The deterministic dQ pass of the backward (every dtype): a CTA owns BLOCK_OWN queries Q_i, dO_i
// of one query head and streams the key tiles they see, accumulating dQ_i in registers; the shared
// machinery and the configuration are in bwd_rows.cuh.
#define ROLE 1
#include "bwd_rows.cuh"

using namespace cuflash;
using namespace cuflash::bwd;

// Grid: attn/schedule.cuh's q_work over p.n_tiles query tiles. dQ_i = scale * sum_j dS_ij K_j is
// written straight to dq in its dtype.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS) flash_bwd_dq(const __grid_constant__ BwdParams p) {
    const FwdParams& f = p.fwd;
    const int head_dim = f.head_dim, head_dim_v = f.head_dim_v;
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = smem_addr(smem);
    const u32 sQ = s_base, sdO = s_base + kOffOwnB;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rg = warp % kRowGroups, ds = warp / kRowGroups;

    const QWork work = q_work(p.n_tiles, f.heads_q, f.group);
    const i64 b = work.b;
    const int h = work.h;
    const int row0 = work.tile * kOwn;
    // A ragged batch's shorter sequences have no rows in the grid's later tiles (fwd_sm80.cu).
    const Seq seq = Seq::of(f, b);
    if (kRagged && row0 >= seq.seqlen_q) return;
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const int row_end = row0 + kOwn < seqlen_q ? row0 + kOwn : seqlen_q;

    const bool vec = p.vec_in != 0;
    const Tensor tq = Tensor::of(f.q, f.q_st, b, h, kElemBytes, seq.q0);
    const Tensor tdo = Tensor::of(p.dout, p.do_st, b, h, kElemBytes, seq.q0);
    const Tensor tk = Tensor::of(f.k, f.k_st, b, work.h_kv, kElemBytes, seq.k0);
    const Tensor tv = Tensor::of(f.v, f.v_st, b, work.h_kv, kElemBytes, seq.k0);

    // The key tiles some row of Q_i sees.
    const Mask mask = Mask::of(f, seq);
    const TileRange keys = mask.key_tiles<kStream>(row0, row_end);
    const int n_iter = keys.count();
    const ScoreMod mod = ScoreMod::of(f, b, h);

    auto load_stream = [&](int it, int stage) {
        const int n0 = (keys.begin + it) * kStream;
        load_tile<kStream>(s_base + kOffStreamA + stage * kStreamStride, tk, n0, seqlen_k, head_dim, vec, tid);
        load_tile<kStream>(s_base + kOffStreamB + stage * kStreamStride, tv, n0, seqlen_k, head_dim_v, vec, tid);
    };
    load_tile<kOwn>(sQ, tq, row0, seqlen_q, head_dim, vec, tid);
    load_tile<kOwn>(sdO, tdo, row0, seqlen_q, head_dim_v, vec, tid);
    if (n_iter > 0) load_stream(0, 0);
    cp_async_commit();

    // L2 and D of this lane's two rows (the buffers are padded, so rows past Sq read +inf and 0).
    const int query_w = row0 + rg * 16 + g;
    const i64 vec_off = ws_row0(p, seq, b, h) + query_w;
    const float l2_row[2] = {p.l2[vec_off], p.l2[vec_off + 8]};
    const float d_row[2] = {p.dsum[vec_off], p.dsum[vec_off + 8]};

    float acc_dq[kAccTiles][4];
    zero_acc(acc_dq);
    const u32 sQ_w = sQ + rg * 16 * kRowBytes;
    const u32 sdO_w = sdO + rg * 16 * kRowBytes;
    const int acc_col0 = ds * kAccCols;

#pragma unroll 1
    for (int it = 0; it < n_iter; ++it) {
        const int stage = it & 1;
        cp_async_wait<0>();
        // Tile `it` has landed for every thread, and every warp is done with tile it-1, whose stage
        // the load below refills.
        __syncthreads();
        if (it + 1 < n_iter) load_stream(it + 1, stage ^ 1);
        cp_async_commit();

        const int n0 = (keys.begin + it) * kStream;
        const u32 sKt = s_base + kOffStreamA + stage * kStreamStride;
        const u32 sVt = s_base + kOffStreamB + stage * kStreamStride;
        const bool masked = !mask.full(row0, row_end, n0, n0 + kStream);

        // P = exp2(logit - L2) with S = Q_i K_j^T; query i of this lane's row half h sees the keys
        // lo[h]..hi[h] of the tile.
        float s[kColTiles][4];
        zero(s);
        product_rows_by_rows(s, sQ_w, sKt, lane);
        int lo[2], hi[2];
        float dist0[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const i64 query = query_w + half * 8;
            mask.keys_of_query(query, n0, kStream, lo[half], hi[half]);
            dist0[half] = kAlibi ? static_cast<float>(query + mask.offset - n0) : 0.f;
        }
        auto l2_of = [&](int half, int) { return l2_row[half]; };
        scores_to_p(s, mod, masked, lo, hi, dist0, l2_of, lane);
        Operand p_op;
        p_op.set(s);

        // dS = P o (dP - D) with dP = dO_i V_j^T.
        float dp[kColTiles][4];
        zero(dp);
        product_rows_by_rows(dp, sdO_w, sVt, lane);
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = ct * 8 + 2 * t + (e & 1);
                const float pe = p_op.get(ct, e);
                dp[ct][e] = pe * (dp[ct][e] - d_row[e >> 1]) *
                            mod.dlogit(pe, l2_row[e >> 1], col_dist(dist0[e >> 1], col));
            }
        Operand dS;
        dS.set(dp);
        // dQ_i += dS K_j (scaled once at the end).
        product_regs_by_tile(acc_dq, dS, sKt + acc_col0 * kElemBytes, lane);
    }
    cp_async_wait<0>();
    // Rows that see no key (L2 = +inf) get dQ = 0 whatever they or K hold: their dS is 0, but 0
    // times a NaN would not be.
#pragma unroll
    for (int ct = 0; ct < kAccTiles; ++ct)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (l2_row[e >> 1] == Num<float>::inf()) acc_dq[ct][e] = 0.f;

    char* const dq_base = static_cast<char*>(p.dq) + (b * p.dq_st.b + h * p.dq_st.h + seq.q0 * p.dq_st.s) * kElemBytes;
    store_acc<Elem>(acc_dq, f.scale, dq_base, p.dq_st.s, p.dq_st.d, row0 + rg * 16, seqlen_q, acc_col0, head_dim, false, lane);
}
