// float32 dK/dV of the backward (3xTF32): a CTA owns BLOCK_OWN keys K_j, V_j of one key/value head
// and streams query tiles; the shared machinery and the configuration are in bwd_rows.cuh.
#define ROLE 0
#include "bwd_rows.cuh"

using namespace cuflash;
using namespace cuflash::bwd;

// Grid and work of a CTA: attn/schedule.cuh's kv_work. With p.f32_out its partial sums of dK
// (already scaled) and dV go to a float32 workspace indexed by split, summed later in a fixed order;
// otherwise straight to dk and dv.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS) flash_bwd_dkdv(const __grid_constant__ BwdParams p) {
    const FwdParams& f = p.fwd;
    const int head_dim = f.head_dim, head_dim_v = f.head_dim_v;
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = smem_addr(smem);
    const u32 sK = s_base, sV = s_base + kOffOwnB;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rg = warp % kRowGroups, ds = warp / kRowGroups;

    const Seq seq = Seq::of(f, kv_batch(p));
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const Mask mask = Mask::of(f, seq);
    const KvWork work = kv_work<kOwn, kStream>(p, mask);
    const i64 b = work.b;
    const int split = work.split, h_kv = work.h_kv, key0 = work.key0, n_iter = work.n_iter;
    // A ragged batch's shorter sequences have no rows in the grid's later key tiles (bwd_dkdv_sm80.cu).
    if (kRagged && key0 >= seqlen_k) return;

    const bool vec = p.vec_in != 0;
    const Tensor tk = Tensor::of(f.k, f.k_st, b, h_kv, kElemBytes, seq.k0);
    const Tensor tv = Tensor::of(f.v, f.v_st, b, h_kv, kElemBytes, seq.k0);

    auto load_stream = [&](KvStep x, int stage) {
        load_query_step<kStream, kThreads, kElemBytes>(
            p, seq, b, x, s_base + kOffStreamA + stage * kStreamStride, s_base + kOffStreamB + stage * kStreamStride,
            s_base + kOffL2 + stage * kVecBytes, s_base + kOffD + stage * kVecBytes, tid,
            [&](u32 smem, const Tensor& t, int row0, int ncols) {
                // Rows that see no key load as zeros (attn/mask.cuh, live_queries); the bounds are
                // recomputed from the parameters here rather than held in registers across the loop.
                int live_lo, live_hi;
                Mask::of(f, seq).live_queries(live_lo, live_hi);
                load_tile<kStream>(smem, t, row0, live_hi, ncols, vec, tid, live_lo);
            });
    };

    load_tile<kOwn>(sK, tk, key0, seqlen_k, head_dim, vec, tid);
    load_tile<kOwn>(sV, tv, key0, seqlen_k, head_dim_v, vec, tid);
    KvStep cur = work.first(), prev = cur;
    if (n_iter > 0) load_stream(cur, 0);
    cp_async_commit();

    float acc_dk[kAccTiles][4], acc_dv[kAccTiles][4];
    zero_acc(acc_dk);
    zero_acc(acc_dv);
    const int acc_col0 = ds * kAccCols;

    // dQ_i += dS K_j for the tile of iteration `it` from its staged dS^T, added to the float32 workspace
    // (B, Hq, Sq_pad, HEAD_DIM), where every row and column of the tile exists.
    auto add_dq_tile = [&](int it, KvStep x) {
        const int h = x.h;
        const int i0 = x.m * kStream;
        const int mg = warp % kDQRowGroups, cg = warp / kDQRowGroups;
        const int m0 = mg * 16;
        const u32 sDS = s_base + kOffDS + (it & 1) * kDSBytes + m0 * kElemBytes;
        float* const dq_rows = p.dq_accum + (ws_row0(p, seq, b, h) + i0 + m0) * kHeadDim;
#pragma unroll
        for (int pass = 0; pass < kDQPasses; ++pass) {
            auto unit_of = [&](int u) { return cg + (pass * kDQPassUnits + u) * kDQUnitStride; };
            if (unit_of(0) * 16 >= head_dim) break;
            float acc_dq[kDQPassUnits][2][4];
#pragma unroll
            for (int u = 0; u < kDQPassUnits; ++u)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc_dq[u][e >> 2][e & 3] = 0.f;
            product_dq(acc_dq, sDS, sK, unit_of, lane);
#pragma unroll
            for (int u = 0; u < kDQPassUnits; ++u)
                if (unit_of(u) < kDQUnits) add_dq_block<kHeadDim>(dq_rows + unit_of(u) * 16, acc_dq[u][0], acc_dq[u][1], lane);
        }
    };

#pragma unroll 1
    for (int it = 0; it < n_iter; ++it) {
        const int stage = it & 1;
        cp_async_wait<0>();
        if constexpr (kSplitStream) {
            split_stream_tile(s_base + kOffStreamA + stage * kStreamStride, tid);
            split_stream_tile(s_base + kOffStreamB + stage * kStreamStride, tid);
        }
        // Tile `it` has landed (and is split) for every thread; every warp is done with tile it-1,
        // whose stage the load below refills, and has staged dS^T of it-1 and read that of it-2.
        __syncthreads();
        const KvStep step = cur;
        cur = work.next(cur);
        if (it + 1 < n_iter) load_stream(cur, stage ^ 1);
        cp_async_commit();

        const int i0 = step.m * kStream;
        // Addresses from a fresh base: hoisted out of the loop, the invariant K_j/V_j fragment
        // addresses held registers for the whole loop and the 128 x 16 tile spilled.
        const u32 base = fresh(s_base);
        const u32 sK_w = base + rg * 16 * kRowBytes;
        const u32 sV_w = base + kOffOwnB + rg * 16 * kRowBytes;
        const u32 sQ = base + kOffStreamA + stage * kStreamStride;
        const u32 sdO = base + kOffStreamB + stage * kStreamStride;
        const u32 sL2 = base + kOffL2 + stage * kVecBytes;
        const u32 sD = base + kOffD + stage * kVecBytes;
        const int i1 = i0 + kStream < seqlen_q ? i0 + kStream : seqlen_q;
        const ScoreMod mod = ScoreMod::of(f, b, step.h);
        const bool masked = !mask.full(i0, i1, key0, key0 + kOwn);
        const int key_w = key0 + rg * 16 + g;  // key of accumulator rows g (+8 for the upper half)

        // P^T = exp2(logit^T - L2) with S^T = K_j Q_i^T; key k of this lane's row half h is seen by
        // the queries lo[h]..hi[h] of the tile.
        float s[kColTiles][4];
        zero(s);
        product_rows_by_rows(s, sK_w, sQ, lane);
        int lo[2], hi[2];
        float dist0[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const i64 key = key_w + half * 8;
            mask.queries_of_key(key, i0, kStream, lo[half], hi[half]);
            dist0[half] = kAlibi ? static_cast<float>(i0 + mask.offset - key) : 0.f;
        }
        auto l2_of = [&](int, int col) { return lds_f32(sL2 + col * 4); };
        scores_to_p(s, mod, masked, lo, hi, dist0, l2_of, lane);
        Operand p_op;
        p_op.set(s);
        // dV_j += P^T dO_i.
        product_regs_by_tile(acc_dv, p_op, sdO + acc_col0 * kElemBytes, lane);

        // dS^T = P^T o (dP^T - D) with dP^T = V_j dO_i^T.
        float dp[kColTiles][4];
        zero(dp);
        product_rows_by_rows(dp, sV_w, sdO, lane);
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct) {
            const float2 dd = lds_f32x2(sD + (ct * 8 + 2 * t) * 4);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = ct * 8 + 2 * t + (e & 1);
                const float pe = p_op.get(ct, e);
                dp[ct][e] = pe * (dp[ct][e] - ((e & 1) ? dd.y : dd.x)) *
                            mod.dlogit(pe, l2_of(0, col), col_dist(dist0[e >> 1], col));
            }
        }
        Operand dS;
        dS.set(dp);
        // dK_j += dS^T Q_i (scaled once at the end).
        product_regs_by_tile(acc_dk, dS, sQ + acc_col0 * kElemBytes, lane);

        if constexpr (kDQAtomic) {
            // Stage dS^T [key][query] in this iteration's buffer (one copy: warps sharing a row group
            // hold the same values); it is read after the next barrier, while the previous
            // iteration's buffer, complete since this iteration's first barrier, feeds dQ now.
            if (ds == 0) dS.store(s_base + kOffDS + stage * kDSBytes + (rg * 16 + g) * kDSRowBytes, kDSRowBytes, lane);
            if (it > 0) add_dq_tile(it - 1, prev);
            prev = step;
        }
    }
    if constexpr (kDQAtomic) {
        if (n_iter > 0) {
            __syncthreads();  // the last iteration's dS^T is staged before warps read it across row groups
            add_dq_tile(n_iter - 1, prev);
        }
    }
    cp_async_wait<0>();

    const int row0 = key0 + rg * 16;
    const int out_bytes = p.f32_out ? 4 : kElemBytes;
    char* const dk_base = static_cast<char*>(p.dk) +
                          (split * p.dk_split + b * p.dk_st.b + h_kv * p.dk_st.h + seq.k0 * p.dk_st.s) * out_bytes;
    char* const dv_base = static_cast<char*>(p.dv) +
                          (split * p.dv_split + b * p.dv_st.b + h_kv * p.dv_st.h + seq.k0 * p.dv_st.s) * out_bytes;
    store_acc<Elem>(acc_dk, f.scale, dk_base, p.dk_st.s, p.dk_st.d, row0, seqlen_k, acc_col0, head_dim, p.f32_out != 0, lane);
    store_acc<Elem>(acc_dv, 1.f, dv_base, p.dv_st.s, p.dv_st.d, row0, seqlen_k, acc_col0, head_dim_v, p.f32_out != 0, lane);
}

