// dK/dV kernel of the float16/bfloat16 backward on sm_90a, with warpgroup MMA (core/wgmma.cuh).
// Same mathematics, work split and parameters as bwd_dkdv_sm80.cu:
//   P_ij = exp2(S_ij * scale * log2 e - LSE_i * log2 e),   dP_ij = dO_i V_j^T,   dS_ij = P_ij o (dP_ij - D_i),
//   dV_j += P_ij^T dO_i,   dK_j += scale * dS_ij^T Q_i,   and with DQ_ATOMIC  dQ_i += scale * dS_ij K_j.
//
// A CTA owns BLOCK_N = 64 * WARPGROUPS keys K_j, V_j of one key/value head; warpgroup w owns keys
// 64w..64w+63 of them. It streams tiles of BLOCK_M queries (Q_i, dO_i, L2_i, D_i) of every query
// head of its share of the GQA group, the next tile loading during the current one. Per tile:
//   S^T = K_w Q_i^T and dP^T = V_w dO_i^T   (64 x BLOCK_M per warpgroup, operands in shared memory)
//   P^T, dS^T in registers, rounded to 16 bits: their accumulator layout is the register A operand
//   dV_w += P^T dO_i, dK_w += dS^T Q_i      (64 x HEAD_DIM accumulators in registers across tiles)
//   DQ_ATOMIC: dS^T goes to shared memory; dQ_i += dS K_j with the (query, dim) tile cut into
//   64 x 64 blocks, one per warpgroup, added to a float32 workspace with vector reductions.
// The products of a warpgroup are issued back to back and waited for only where their results are
// needed: the exponentials of P run while dP is computed, dS while dV is. With 128-query tiles dP
// comes in two chunks of 64 queries, the second computed after the first one's dS.
//
// Configuration (#define lines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM 64 or 128, bucket of max(D, Dv); smaller D/Dv are zero-padded on load
//   BLOCK_M  queries per streamed tile (64 or 128)     WARPGROUPS  BLOCK_N / 64
//   STAGES   2 (double buffering)                      MIN_BLOCKS  __launch_bounds__
//   DQ_ATOMIC 1: also accumulate dQ                    DTYPE  1 float16, 2 bfloat16
//   SCORE_MODS  score modifiers (attn/score_mod.cuh)
//   SEQ_MODE    0 dense, 1 ragged (attn/seqlen.cuh)
//   SMEM_BYTES  the launcher's dynamic shared memory, checked against the layout below
//
// Masking: attn/mask.cuh. The preprocess kernel (bwd_aux.cu) hands over L2_i = LSE_i * log2 e,
// +inf for rows that see no key and for the padding rows up to a multiple of 128, so
// exp2(logit - L2_i) = 0 there, never NaN.
#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"
#include "../core/wgmma.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(WARPGROUPS) || !defined(STAGES) || !defined(MIN_BLOCKS) || \
    !defined(DQ_ATOMIC) || !defined(SMEM_BYTES)
#error "bwd_dkdv_sm90.cu needs HEAD_DIM, BLOCK_M, WARPGROUPS, STAGES, MIN_BLOCKS, DQ_ATOMIC, SMEM_BYTES"
#endif

namespace cuflash {
namespace bwd_wg {

static_assert(!kIsF32, "bwd_dkdv_sm90.cu is a 16-bit kernel: DTYPE must be 1 (float16) or 2 (bfloat16)");

constexpr int kHeadDim = HEAD_DIM;
constexpr int kM = BLOCK_M;
constexpr int kGroups = WARPGROUPS;
constexpr int kN = 64 * kGroups;
constexpr int kThreads = 128 * kGroups;
constexpr int kStages = STAGES;
constexpr bool kDQAtomic = DQ_ATOMIC != 0;
// dQ blocks: the BLOCK_M x HEAD_DIM tile in kDqRowBlocks x kDqColBlocks blocks of 64 x kDqCols
// (whole 64-column swizzle blocks), one per warpgroup; with fewer blocks than warpgroups the
// last warpgroups have none (one warpgroup's wgmma can keep every tensor core of the SM busy).
constexpr int kDqRowBlocks = kM / 64;
constexpr int kDqCols = kHeadDim * kDqRowBlocks / kGroups > 64 ? kHeadDim * kDqRowBlocks / kGroups : 64;
constexpr int kDqColBlocks = kHeadDim / kDqCols;
constexpr int kDqBlocks = kDqRowBlocks * kDqColBlocks;
// dP^T is computed in chunks of kDpCols queries. With dQ at 128-query tiles, S and dP (64 registers
// each) beside P's 16-bit copy, dK and dV do not fit in 255 registers: two chunks of 64. Without
// dQ ptxas fits the whole tile (and spills with chunks), as it reports for each instantiation.
constexpr int kDpCols = kDQAtomic ? 64 : kM;

// Shared memory (Swizzle128 tiles, 1024-byte aligned): K_j, V_j, kStages each of Q_i and dO_i, dS^T
// [key][query], kStages each of L2 and D. The launcher adds 1024 bytes so the base can be aligned.
constexpr int kKeyTileBytes = kN * kHeadDim * 2;
constexpr int kQueryTileBytes = kM * kHeadDim * 2;
constexpr int kDSBytes = kDQAtomic ? kN * kM * 2 : 0;
constexpr int kVecBytes = kM * 4;
constexpr int kOffV = kKeyTileBytes;
constexpr int kOffQ = 2 * kKeyTileBytes;
constexpr int kOffDO = kOffQ + kStages * kQueryTileBytes;
constexpr int kOffDS = kOffDO + kStages * kQueryTileBytes;
constexpr int kOffL2 = kOffDS + kDSBytes;
constexpr int kOffD = kOffL2 + kStages * kVecBytes;
constexpr int kSmemBytes = kOffD + kStages * kVecBytes + 1024;

static_assert(kHeadDim == 64 || kHeadDim == 128, "HEAD_DIM must be 64 or 128 (whole 128-byte swizzle rows)");
static_assert(kM == 64 || kM == 128, "BLOCK_M must be 64 or 128 (the N of one wgmma)");
static_assert(kGroups == 2, "WARPGROUPS: two warpgroups own the 128 keys");
static_assert(kDqBlocks <= kGroups && kDqCols % 64 == 0 && kDqCols <= 128 && kDqCols * kDqColBlocks == kHeadDim,
              "the dQ tile must split into at most one 64-row block of whole 64-column blocks per warpgroup");
static_assert(kStages == 2, "STAGES: the streamed tiles are double buffered");
static_assert(128 % kM == 0, "BLOCK_M must divide the 128-row padding of L2 and D");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid,
                                          int row_lo = 0) {
    cuflash::load_tile<ROWS, kHeadDim, 2, kThreads, wg::Swizzle128<ROWS>>(smem, t, row0, nrows, ncols, vec, tid, row_lo);
}

template <int NT>
__device__ __forceinline__ void zero(float (&x)[NT][4]) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
}

// The register A operand of the next product: k16 step kk packs n8 tiles 2kk, 2kk + 1 to 16 bits.
__device__ __forceinline__ void pack_step(u32 (&a)[4], const float (&x0)[4], const float (&x1)[4]) {
    a[0] = pack2<Elem>(x0[0], x0[1]);
    a[1] = pack2<Elem>(x0[2], x0[3]);
    a[2] = pack2<Elem>(x1[0], x1[1]);
    a[3] = pack2<Elem>(x1[2], x1[3]);
}

template <int NT>
__device__ __forceinline__ void pack(u32 (&a)[NT / 2][4], const float (&x)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) pack_step(a[kk], x[2 * kk], x[2 * kk + 1]);
}

// acc (64 keys x N) = A_w B^T over HEAD_DIM: rows row0.. of the key tile sA, rows brow0.. of the
// query tile sB.
template <int N>
__device__ __forceinline__ void product_keys_by_queries(float (&acc)[N / 8][4], u32 sA, int row0, u32 sB, int brow0) {
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
        wg::mma_ss<Elem, N, 0, 0>(acc, wg::k_major<kN>(sA, row0, kk), wg::k_major<kM>(sB, brow0, kk), kk > 0);
}

// acc (64 keys x HEAD_DIM) += X B over the kM queries: X in registers, B a [query][dim] tile.
__device__ __forceinline__ void product_regs_by_queries(float (&acc)[kHeadDim / 8][4], const u32 (&x)[kM / 16][4],
                                                        u32 sB) {
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) wg::mma_rs<Elem, kHeadDim, 1>(acc, x[kk], wg::mn_major<kM>(sB, 0, kk), 1);
}

}  // namespace bwd_wg
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::bwd_wg;

// Grid and work of a CTA: attn/schedule.cuh's kv_work. With p.f32_out its partial sums of dK
// (already scaled) and dV go to a float32 workspace indexed by split, summed later in a fixed order;
// otherwise straight to dk and dv.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS) flash_bwd_dkdv(const __grid_constant__ BwdParams p) {
    const FwdParams& f = p.fwd;
    const int head_dim = f.head_dim, head_dim_v = f.head_dim_v;
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = (smem_addr(smem) + 1023u) & ~1023u;

    const int tid = threadIdx.x;
    const int lane = tid & 31, group_id = tid >> 7;
    const int g = lane >> 2, t = lane & 3;
    // This thread's accumulator rows: keys n_w + g, + 8 of the CTA's tile (warp (tid / 32) % 4 of
    // warpgroup group_id); its dQ block: queries m_dq.., dims d_dq..
    const int n_wg = group_id * 64;
    const int n_w = n_wg + ((tid >> 5) & 3) * 16;
    const int m_dq = (group_id % kDqRowBlocks) * 64, d_dq = (group_id / kDqRowBlocks) * kDqCols;

    const Seq seq = Seq::of(f, kv_batch(p));
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const Mask mask = Mask::of(f, seq);
    const KvWork work = kv_work<kN, kM>(p, mask);
    const i64 b = work.b;
    const int h_kv = work.h_kv, key0 = work.key0;
    // A ragged batch's shorter sequences have no rows in the grid's later key tiles (bwd_dkdv_sm80.cu).
    if (kRagged && key0 >= seqlen_k) return;

    const bool vec = p.vec_in != 0;
    const Tensor tk = Tensor::of(f.k, f.k_st, b, h_kv, 2, seq.k0);
    const Tensor tv = Tensor::of(f.v, f.v_st, b, h_kv, 2, seq.k0);

    auto load_stream = [&](KvStep x, int stage) {
        load_query_step<kM, kThreads, 2>(
            p, seq, b, x, s_base + kOffQ + stage * kQueryTileBytes, s_base + kOffDO + stage * kQueryTileBytes,
            s_base + kOffL2 + stage * kVecBytes, s_base + kOffD + stage * kVecBytes, tid,
            [&](u32 smem, const Tensor& t, int row0, int ncols) {
                // Rows that see no key load as zeros (attn/mask.cuh, live_queries); the bounds are
                // recomputed from the parameters here rather than held in registers across the loop.
                int live_lo, live_hi;
                Mask::of(f, seq).live_queries(live_lo, live_hi);
                load_tile<kM>(smem, t, row0, live_hi, ncols, vec, tid, live_lo);
            });
    };

    load_tile<kN>(s_base, tk, key0, seqlen_k, head_dim, vec, tid);
    load_tile<kN>(s_base + kOffV, tv, key0, seqlen_k, head_dim_v, vec, tid);
    KvStep cur = work.first();
    if (work.n_iter > 0) load_stream(cur, 0);
    cp_async_commit();

    float acc_dk[1][kHeadDim / 8][4], acc_dv[1][kHeadDim / 8][4];
    zero(acc_dk[0]);
    zero(acc_dv[0]);

#pragma unroll 1
    for (int it = 0; it < work.n_iter; ++it) {
        const int stage = it & 1;
        cp_async_wait<0>();
        // Tile `it` is visible to the async proxy of every thread; every warpgroup is done with tile
        // it-1 (whose stage is refilled below) and with the dS^T of it-1 (overwritten below).
        wg::fence_async_smem();
        __syncthreads();
        const KvStep next = work.next(cur);
        if (it + 1 < work.n_iter) load_stream(next, stage ^ 1);
        cp_async_commit();

        const int h = cur.h;
        const int i0 = cur.m * kM;
        cur = next;
        // Addresses and descriptors from a fresh base, computed where used rather than held across
        // the loop (the invariant ones of K, V and dS^T would be about 60 registers).
        const u32 base = fresh(s_base);
        const u32 sK = base, sV = base + kOffV, sDS = base + kOffDS;
        const u32 sQ = base + kOffQ + stage * kQueryTileBytes;
        const u32 sdO = base + kOffDO + stage * kQueryTileBytes;
        const u32 sL2 = base + kOffL2 + stage * kVecBytes;
        const u32 sD = base + kOffD + stage * kVecBytes;

        float s[kM / 8][4], dp[kDpCols / 8][4];
        wg::fence();
        product_keys_by_queries<kM>(s, sK, n_wg, sQ, 0);
        wg::commit();
        product_keys_by_queries<kDpCols>(dp, sV, n_wg, sdO, 0);
        wg::commit();
        wg::wait<1>();
        wg::pin(s);

        // P^T = exp2(logit^T - L2) for keys n_w + g (+8) and this lane's query columns. Warp tiles
        // wholly inside the mask's band (or past Sq, where L2 = +inf) need no mask. L2 of this
        // lane's query columns nt * 8 + 2t, +1 is read where it is used (holding all of it beside S,
        // dP, dK and dV would spill at 128-query tiles).
        const ScoreMod mod = ScoreMod::of(f, b, h);
        const int i1 = i0 + kM < seqlen_q ? i0 + kM : seqlen_q;
        const int k0 = key0 + n_w;
        const bool masked = i1 > i0 && !mask.full(i0, i1, k0, k0 + 16);
        float dist0[2];
#pragma unroll
        for (int half = 0; half < 2; ++half)
            dist0[half] = kAlibi ? static_cast<float>(i0 + mask.offset - (k0 + g + half * 8)) : 0.f;
        if (masked) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                // Key k of this row is seen by the tile's queries lo..hi.
                int lo, hi;
                mask.queries_of_key(k0 + g + half * 8, i0, kM, lo, hi);
#pragma unroll
                for (int nt = 0; nt < kM / 8; ++nt) {
                    const float2 l2c = lds_f32x2(sL2 + (nt * 8 + 2 * t) * 4);
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = nt * 8 + 2 * t + e;
                        float& x = s[nt][half * 2 + e];
                        const float pe = p_from_lse(mod.logit2(x, dist0[half] + static_cast<float>(col)), e ? l2c.y : l2c.x);
                        x = col < lo || col > hi ? 0.f : pe;
                    }
                }
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < kM / 8; ++nt) {
                const float2 l2c = lds_f32x2(sL2 + (nt * 8 + 2 * t) * 4);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + 2 * t + (e & 1);
                    float& x = s[nt][e];
                    x = p_from_lse(mod.logit2(x, dist0[e >> 1] + static_cast<float>(col)), (e & 1) ? l2c.y : l2c.x);
                }
            }
        }
        u32 p16[kM / 16][4];
        pack<kM / 8>(p16, s);
        wg::fence();
        product_regs_by_queries(acc_dv[0], p16, sdO);
        wg::commit();

        // dS^T = P^T o (dP^T - D), from the float32 P, one chunk of kDpCols queries at a time.
        u32 ds16[kM / 16][4];
#pragma unroll
        for (int c = 0; c < kM / kDpCols; ++c) {
            if (c > 0) {
                wg::fence();
                product_keys_by_queries<kDpCols>(dp, sV, n_wg, sdO, c * kDpCols);
                wg::commit();
            }
            // Chunk 0 was issued before dV, which may stay in flight; later chunks come after it.
            if (c == 0) wg::wait<1>();
            else wg::wait<0>();
            wg::pin(dp);
#pragma unroll
            for (int j = 0; j < kDpCols / 8; ++j) {
                const int nt = c * (kDpCols / 8) + j;
                const float2 dc = lds_f32x2(sD + (nt * 8 + 2 * t) * 4);
                float2 l2c = {0.f, 0.f};
                if constexpr (kSoftcap) l2c = lds_f32x2(sL2 + (nt * 8 + 2 * t) * 4);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float dist = dist0[e >> 1] + static_cast<float>(nt * 8 + 2 * t + (e & 1));
                    dp[j][e] = s[nt][e] * (dp[j][e] - ((e & 1) ? dc.y : dc.x)) *
                               mod.dlogit(s[nt][e], (e & 1) ? l2c.y : l2c.x, dist);
                }
            }
#pragma unroll
            for (int kk = 0; kk < kDpCols / 16; ++kk)
                pack_step(ds16[c * (kDpCols / 16) + kk], dp[2 * kk], dp[2 * kk + 1]);
        }
        if constexpr (kDQAtomic) {
            // dS^T rows n_w + g (+8), 16-bit, for the dQ product of every warpgroup.
#pragma unroll
            for (int kk = 0; kk < kM / 16; ++kk)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = n_w + g + (e & 1) * 8;
                    const int chunk = 2 * kk + (e >> 1);
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sDS + wg::swizzle128<kN>(row, chunk) + t * 4),
                                 "r"(ds16[kk][e])
                                 : "memory");
                }
        }
        wg::fence();
        product_regs_by_queries(acc_dk[0], ds16, sQ);
        wg::commit();

        if constexpr (kDQAtomic) {
            // dQ_i += dS K_j: dS is the transpose of the staged dS^T [key][query] (an MN-major A);
            // K_j [key][dim] is MN-major too. Column blocks at or past head_dim would add zeros.
            wg::fence_async_smem();
            __syncthreads();
            if (group_id < kDqBlocks && d_dq < head_dim) {
                float dq[kDqCols / 8][4];
                wg::fence();
#pragma unroll
                for (int kk = 0; kk < kN / 16; ++kk)
                    wg::mma_ss<Elem, kDqCols, 1, 1>(dq, wg::mn_major<kN>(sDS, m_dq, kk), wg::mn_major<kN>(sK, d_dq, kk),
                                                    kk > 0);
                wg::commit();
                wg::wait<0>();
                wg::pin(dq);
                wg::pin(p16);
                wg::pin(ds16);
                float* const dq_rows =
                    p.dq_accum + (ws_row0(p, seq, b, h) + i0 + m_dq + (n_w - n_wg)) * kHeadDim + d_dq;
#pragma unroll
                for (int np = 0; np < kDqCols / 16; ++np)
                    if (d_dq + np * 16 < head_dim)
                        add_dq_block<kHeadDim>(dq_rows + np * 16, dq[2 * np], dq[2 * np + 1], lane);
            }
        }
        wg::wait<0>();
        wg::pin(acc_dv[0]);
        wg::pin(acc_dk[0]);
    }
    cp_async_wait<0>();

    const int row0 = key0 + n_w;
    const int out_bytes = p.f32_out ? 4 : 2;
    char* const dk_base = static_cast<char*>(p.dk) +
                          (work.split * p.dk_split + b * p.dk_st.b + h_kv * p.dk_st.h + seq.k0 * p.dk_st.s) * out_bytes;
    char* const dv_base = static_cast<char*>(p.dv) +
                          (work.split * p.dv_split + b * p.dv_st.b + h_kv * p.dv_st.h + seq.k0 * p.dv_st.s) * out_bytes;
    store_acc<Elem>(acc_dk, f.scale, dk_base, p.dk_st.s, p.dk_st.d, row0, seqlen_k, 0, head_dim, p.f32_out != 0, lane);
    store_acc<Elem>(acc_dv, 1.f, dv_base, p.dv_st.s, p.dv_st.d, row0, seqlen_k, 0, head_dim_v, p.f32_out != 0, lane);
}
