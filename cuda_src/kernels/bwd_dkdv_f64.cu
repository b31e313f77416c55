// float64 dK/dV of the backward (FP64 tensor cores): a CTA owns BLOCK_OWN keys K_j, V_j of one
// key/value head and streams query tiles; the shared machinery and the configuration are in
// bwd_rows_f64.cuh. The structure is bwd_dkdv_f32.cu's.
#define ROLE 0
#include "bwd_rows_f64.cuh"

using namespace cuflash;
using namespace cuflash::bwd64;

// Grid and work of a CTA: attn/schedule.cuh's kv_work. With p.f32_out its partial sums of dK
// (already scaled) and dV go to a float64 workspace indexed by split, summed later in a fixed order;
// otherwise straight to dk and dv.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS) flash_bwd_dkdv(const __grid_constant__ Params p) {
    const FwdParamsOf<double>& f = p.fwd;
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
    const Tensor tk = Tensor::of(f.k, f.k_st, b, h_kv, 8, seq.k0);
    const Tensor tv = Tensor::of(f.v, f.v_st, b, h_kv, 8, seq.k0);

    auto load_stream = [&](KvStep x, int stage) {
        load_query_step<kStream, kThreads, 8>(
            p, seq, b, x, s_base + kOffStreamA + stage * kStreamTileBytes, s_base + kOffStreamB + stage * kStreamTileBytes,
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

    double acc_dk[1][kAccTiles][4], acc_dv[1][kAccTiles][4];
    zero(acc_dk);
    zero(acc_dv);
    const int acc_col0 = ds * kAccCols;

    // dQ_i^T += K_j^T dS^T for the tile of iteration `it` from its staged dS^T [key][query], added to
    // the float64 workspace (B, Hq, Sq_pad, HEAD_DIM), where every row and column of the tile exists.
    auto add_dq_tile = [&](int it, KvStep x) {
        const u32 sDS = s_base + kOffDS + (it & 1) * kDSBytes;
        double* const dq_rows = p.dq_accum + (ws_row0(p, seq, b, x.h) + x.m * kStream) * kHeadDim;
#pragma unroll 1
        for (int pass = 0; pass < kDQPasses; ++pass) {
            const int blk = warp + pass * kWarps;  // 16 columns of dQ from blk * 16
            if (blk >= kDQBlocks || blk * 16 >= head_dim) break;
            double acc[kColTiles][4];
#pragma unroll
            for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[ct][e] = 0.0;
            dmma_cols_by_tile<kColTiles, kOwn, kRowBytes, kDSRowBytes>(acc, sK + blk * 128, sDS, lane);
            // acc[ct][e]: dQ^T row (dim) blk * 16 + g + 8 (e >> 1), column (query) ct * 8 + 2t + (e & 1).
#pragma unroll
            for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    atomicAdd(dq_rows + static_cast<i64>(ct * 8 + 2 * t + (e & 1)) * kHeadDim + blk * 16 + g + 8 * (e >> 1),
                              acc[ct][e]);
        }
    };

#pragma unroll 1
    for (int it = 0; it < n_iter; ++it) {
        const int stage = kStages == 2 ? (it & 1) : 0;
        cp_async_wait<0>();
        // Tile `it` has landed for every thread; every warp is done with tile it-1 (whose stage the
        // load below refills with double buffering), has staged dS^T of it-1 and read that of it-2.
        __syncthreads();
        const KvStep step = cur;
        cur = work.next(cur);
        if constexpr (kStages == 2) {
            if (it + 1 < n_iter) load_stream(cur, stage ^ 1);
            cp_async_commit();
        }

        const int i0 = step.m * kStream;
        // Addresses from a fresh base: loop-invariant fragment addresses hoisted out of the loop would
        // hold registers for the whole loop.
        const u32 base = fresh(s_base);
        const u32 sK_w = base + rg * 16 * kRowBytes;
        const u32 sV_w = base + kOffOwnB + rg * 16 * kRowBytes;
        const u32 sQ = base + kOffStreamA + stage * kStreamTileBytes;
        const u32 sdO = base + kOffStreamB + stage * kStreamTileBytes;
        const u32 sL2 = base + kOffL2 + stage * kVecBytes;
        const u32 sD = base + kOffD + stage * kVecBytes;
        const int i1 = i0 + kStream < seqlen_q ? i0 + kStream : seqlen_q;
        const Mod mod = Mod::of(f, b, step.h);
        const bool masked = !mask.full(i0, i1, key0, key0 + kOwn);
        const int key_w = key0 + rg * 16 + g;  // key of accumulator rows g (+8 for the upper half)

        // P^T = exp2(logit^T - L2) with S^T = K_j Q_i^T; key k of this lane's row half h is seen by
        // the queries lo[h]..hi[h] of the tile.
        double s[1][kColTiles][4];
        zero(s);
        product_rows_by_rows(s, sK_w, sQ, lane);
        int lo[2], hi[2];
        double dist0[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const i64 key = key_w + half * 8;
            mask.queries_of_key(key, i0, kStream, lo[half], hi[half]);
            dist0[half] = kAlibi ? static_cast<double>(i0 + mask.offset - key) : 0.0;
        }
        auto l2_of = [&](int, int col) { return lds_f64(sL2 + col * 8); };
        scores_to_p(s, mod, masked, lo, hi, dist0, l2_of, lane);
        // dV_j += P^T dO_i.
        product_regs_by_tile(acc_dv, s, sdO + acc_col0 * 8, lane);

        // dS^T = P^T o (dP^T - D) with dP^T = V_j dO_i^T.
        double dp[1][kColTiles][4];
        zero(dp);
        product_rows_by_rows(dp, sV_w, sdO, lane);
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct) {
            double dd[2];
            lds_f64x2(sD + (ct * 8 + 2 * t) * 8, dd[0], dd[1]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = ct * 8 + 2 * t + (e & 1);
                const double pe = s[0][ct][e];
                dp[0][ct][e] = pe * (dp[0][ct][e] - dd[e & 1]) * mod.dlogit(pe, l2_of(0, col), col_dist(dist0[e >> 1], col));
            }
        }
        // dK_j += dS^T Q_i (scaled once at the end).
        product_regs_by_tile(acc_dk, dp, sQ + acc_col0 * 8, lane);

        if constexpr (kDQAtomic) {
            // Stage dS^T [key][query] in this iteration's buffer (one copy: warps sharing a row group
            // hold the same values); it is read after the next barrier, while the previous
            // iteration's buffer, complete since this iteration's first barrier, feeds dQ now.
            if (ds == 0) {
                const u32 row = s_base + kOffDS + (it & 1) * kDSBytes + (rg * 16 + g) * kDSRowBytes + 2 * t * 8;
#pragma unroll
                for (int ct = 0; ct < kColTiles; ++ct) {
                    sts_f64x2(row + ct * 64, dp[0][ct][0], dp[0][ct][1]);
                    sts_f64x2(row + 8 * kDSRowBytes + ct * 64, dp[0][ct][2], dp[0][ct][3]);
                }
            }
            if (it > 0) add_dq_tile(it - 1, prev);
            prev = step;
        }
        if constexpr (kStages == 1) {
            // Every warp is done with the streamed tile before the next one overwrites it.
            __syncthreads();
            if (it + 1 < n_iter) load_stream(cur, 0);
            cp_async_commit();
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
    char* const dk_base =
        static_cast<char*>(p.dk) + (split * p.dk_split + b * p.dk_st.b + h_kv * p.dk_st.h + seq.k0 * p.dk_st.s) * 8;
    char* const dv_base =
        static_cast<char*>(p.dv) + (split * p.dv_split + b * p.dv_st.b + h_kv * p.dv_st.h + seq.k0 * p.dv_st.s) * 8;
    store_acc<double>(acc_dk, f.scale, dk_base, p.dk_st.s, p.dk_st.d, row0, seqlen_k, acc_col0, head_dim, false, lane);
    store_acc<double>(acc_dv, 1.0, dv_base, p.dv_st.s, p.dv_st.d, row0, seqlen_k, acc_col0, head_dim_v, false, lane);
}
