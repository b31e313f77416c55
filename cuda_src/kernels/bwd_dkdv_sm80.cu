// dK/dV kernel of the float16/bfloat16 backward (FlashAttention-2 order, by recomputation):
//   P_ij = exp2(S_ij * scale * log2 e - LSE_i * log2 e),   dP_ij = dO_i V_j^T,   dS_ij = P_ij o (dP_ij - D_i),
//   dV_j += P_ij^T dO_i,   dK_j += scale * dS_ij^T Q_i,   and with DQ_ATOMIC  dQ_i += scale * dS_ij K_j.
//
// A CTA owns BLOCK_N keys K_j, V_j of one key/value head and streams tiles of BLOCK_M queries
// (Q_i, dO_i, L2_i, D_i) of every query head of its share of the GQA group, the next tile loading
// during the current one (STAGES 2) or after it (STAGES 1, where shared memory is small).
// Each tile pair runs in two phases separated by a barrier, each with its own cut of the work into
// warp tiles (32 rows where the accumulators leave room, as at d <= 128, so that each loaded
// fragment feeds two or more mma; 16 rows for the largest head dims):
//   phase 1  S^T = K_j Q_i^T and dP^T = V_j dO_i^T, cut WARPS_N_SDP (keys) x rest (queries); the warp
//            turns its part into P^T and dS^T (from the float32 P) and stores both, 16-bit, in
//            shared memory [key][query];
//   phase 2  dV_j += P^T dO_i and dK_j += dS^T Q_i, cut WARPS_N_DKV (keys) x rest (head dim): the
//            accumulators stay in registers across tiles;
//            dQ_i += dS K_j (DQ_ATOMIC), cut WARPS_M_DQ (queries) x rest (head dim), added to a float32
//            workspace with vector reductions (run-to-run bit differences, as addition reorders).
// Without DQ_ATOMIC the deterministic dQ kernel (bwd_dq.cu) computes dQ.
//
// Configuration (#define lines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM  bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_N   keys per CTA     BLOCK_M  queries per streamed tile     NUM_WARPS  warps per CTA
//   STAGES    streamed tiles resident (2: double buffering)
//   WARPS_N_SDP, WARPS_N_DKV, WARPS_M_DQ  the warp grids above        MIN_BLOCKS  __launch_bounds__
//   KK_UNROLL, DQ_UNROLL  unroll of the k16 loops of S/dP and of dQ (registers against latency hiding)
//   DQ_ATOMIC 1: also accumulate dQ                                   DTYPE  1 float16, 2 bfloat16
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

#if !defined(HEAD_DIM) || !defined(BLOCK_N) || !defined(BLOCK_M) || !defined(NUM_WARPS) || !defined(WARPS_N_SDP) || \
    !defined(WARPS_N_DKV) || !defined(WARPS_M_DQ) || !defined(STAGES) || !defined(MIN_BLOCKS) ||                    \
    !defined(KK_UNROLL) || !defined(DQ_UNROLL) || !defined(DQ_ATOMIC) || !defined(SMEM_BYTES)
#error "bwd_dkdv_sm80.cu needs HEAD_DIM, BLOCK_N, BLOCK_M, NUM_WARPS, WARPS_N_SDP, WARPS_N_DKV, WARPS_M_DQ, STAGES, MIN_BLOCKS, KK_UNROLL, DQ_UNROLL, DQ_ATOMIC, SMEM_BYTES"
#endif

namespace cuflash {
namespace bwd_kv {

static_assert(!kIsF32, "bwd_dkdv_sm80.cu is the 16-bit kernel: DTYPE must be 1 (float16) or 2 (bfloat16)");

constexpr int kHeadDim = HEAD_DIM;
constexpr int kN = BLOCK_N;
constexpr int kM = BLOCK_M;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr bool kDQAtomic = DQ_ATOMIC != 0;
constexpr int kKKUnroll = KK_UNROLL;
constexpr int kDQUnroll = DQ_UNROLL;
constexpr int kStages = STAGES;

// Warp tiles of the three products (rows x columns; MT m16 tiles by NT n8 tiles).
constexpr int kSdpRows = kN / WARPS_N_SDP, kSdpCols = kM / (kWarps / WARPS_N_SDP);
constexpr int kKvRows = kN / WARPS_N_DKV, kKvCols = kHeadDim / (kWarps / WARPS_N_DKV);
constexpr int kDqRows = kM / WARPS_M_DQ, kDqCols = kHeadDim / (kWarps / WARPS_M_DQ);
constexpr int kSdpMT = kSdpRows / 16, kSdpNT = kSdpCols / 8;
constexpr int kKvMT = kKvRows / 16, kKvNT = kKvCols / 8;
constexpr int kDqMT = kDqRows / 16;
constexpr int kDqTailNT = (kDqCols % 64) / 8;  // n8 tiles of the last dQ pass narrower than 64 columns
constexpr int kDqTailNTOr2 = kDqTailNT > 0 ? kDqTailNT : 2;  // a valid width where there is no such pass

// One 16-byte pad per row: the 8 row addresses of an ldmatrix fall in 8 different 16-byte bank
// groups, so tiles load (and P^T, dS^T store) without bank conflicts.
constexpr int kRowBytes = (kHeadDim + 8) * 2;  // K, V, Q, dO rows
constexpr int kPRowBytes = (kM + 8) * 2;       // P^T, dS^T rows (one key, kM queries)
constexpr int kKeyTileBytes = kN * kRowBytes;
constexpr int kQueryTileBytes = kM * kRowBytes;
constexpr int kVecBytes = kM * 4;
constexpr int kPBytes = kN * kPRowBytes;
// Shared memory: K_j, V_j, kStages each of Q_i, dO_i, L2, D, then P^T, dS^T.
constexpr int kOffV = kKeyTileBytes;
constexpr int kOffQ = 2 * kKeyTileBytes;
constexpr int kOffDO = kOffQ + kStages * kQueryTileBytes;
constexpr int kOffL2 = kOffDO + kStages * kQueryTileBytes;
constexpr int kOffD = kOffL2 + kStages * kVecBytes;
constexpr int kOffP = kOffD + kStages * kVecBytes;
constexpr int kOffDS = kOffP + kPBytes;
constexpr int kSmemBytes = kOffDS + kPBytes;

static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16, "NUM_WARPS must be in 1..16");
static_assert(kWarps % WARPS_N_SDP == 0 && kWarps % WARPS_N_DKV == 0 && kWarps % WARPS_M_DQ == 0,
              "the warp grids must use every warp");
static_assert(kSdpRows % 16 == 0 && kSdpCols % 16 == 0 && kSdpRows * WARPS_N_SDP == kN &&
                  kSdpCols * (kWarps / WARPS_N_SDP) == kM,
              "S/dP warp tiles must be whole m16 x n16 tiles covering BLOCK_N x BLOCK_M");
static_assert(kKvRows % 16 == 0 && kKvCols % 16 == 0 && kKvRows * WARPS_N_DKV == kN &&
                  kKvCols * (kWarps / WARPS_N_DKV) == kHeadDim,
              "dK/dV warp tiles must be whole m16 x n16 tiles covering BLOCK_N x HEAD_DIM");
static_assert(kDqRows % 16 == 0 && kDqCols % 16 == 0 && kDqRows * WARPS_M_DQ == kM &&
                  kDqCols * (kWarps / WARPS_M_DQ) == kHeadDim,
              "dQ warp tiles must be whole m16 x n16 tiles covering BLOCK_M x HEAD_DIM");
static_assert(kStages == 1 || kStages == 2, "STAGES: 1 (single buffer, for small shared memory) or 2");
static_assert(128 % kN == 0 && 128 % kM == 0, "tile sizes must divide the 128-row padding of L2 and D");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");
static_assert((kRowBytes / 4) % 8 == 4 && (kPRowBytes / 4) % 8 == 4,
              "row strides must keep the 8 rows of an ldmatrix on distinct bank groups");

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid,
                                          int row_lo = 0) {
    cuflash::load_tile<ROWS, kHeadDim, 2, kThreads, PaddedRows<kRowBytes>>(smem, t, row0, nrows, ncols, vec, tid, row_lo);
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&x)[MT][NT][4]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) x[i][j][e] = 0.f;
}

// acc[mt][nt] += A B for one warp tile: A is (16 MT) x (16 KSTEPS), B is (16 KSTEPS) x (8 NT).
// A_ROW_MAJOR: A is stored [m][k] (ldmatrix), else [k][m] (ldmatrix.trans). B_ROWS_N: B is stored
// [n][k], i.e. its rows are the columns of B (ldmatrix), else [k][n] (ldmatrix.trans).
// Addresses point at the warp tile's first element; row strides in bytes.
template <int MT, int NT, int KSTEPS, int UNROLL, bool A_ROW_MAJOR, bool B_ROWS_N>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], u32 sA, int a_row_bytes, u32 sB, int b_row_bytes,
                                         int lane) {
    static_assert(NT % 2 == 0, "B fragments load in pairs of n8 tiles");
    const int r8 = lane & 7, bit3 = (lane >> 3) & 1, bit4 = lane >> 4;
    // Lanes 8i..8i+7 address the rows of matrix i: A fragment matrices are (m0-7,k0-7), (m8-15,k0-7),
    // (m0-7,k8-15), (m8-15,k8-15); a B pair is (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15).
    const u32 a_lane = A_ROW_MAJOR ? sA + (r8 + bit3 * 8) * a_row_bytes + bit4 * 16
                                   : sA + (r8 + bit4 * 8) * a_row_bytes + bit3 * 16;
    const u32 b_lane = B_ROWS_N ? sB + (r8 + bit4 * 8) * b_row_bytes + bit3 * 16
                                : sB + (r8 + bit3 * 8) * b_row_bytes + bit4 * 16;
#pragma unroll UNROLL
    for (int kk = 0; kk < KSTEPS; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (A_ROW_MAJOR) ldmatrix_x4(a[mt], a_lane + mt * 16 * a_row_bytes + kk * 32);
            else ldmatrix_x4_trans(a[mt], a_lane + kk * 16 * a_row_bytes + mt * 32);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            u32 b[4];
            if (B_ROWS_N) ldmatrix_x4(b, b_lane + np * 16 * b_row_bytes + kk * 32);
            else ldmatrix_x4_trans(b, b_lane + kk * 16 * b_row_bytes + np * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_m16n8k16<Elem>(acc[mt][2 * np], a[mt], b0);
                mma_m16n8k16<Elem>(acc[mt][2 * np + 1], a[mt], b1);
            }
        }
    }
}

// Stores a warp tile (accumulator layout) as 16-bit rows at `tile` (row stride row_bytes).
template <int MT, int NT>
__device__ __forceinline__ void store_tile16(const float (&x)[MT][NT][4], u32 tile, int row_bytes, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const u32 addr = tile + (mt * 16 + g) * row_bytes + (nt * 8 + 2 * t) * 2;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack2<Elem>(x[mt][nt][0], x[mt][nt][1])) : "memory");
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr + 8 * row_bytes), "r"(pack2<Elem>(x[mt][nt][2], x[mt][nt][3]))
                         : "memory");
        }
}

// One pass of dQ over 8 NT columns of this warp's tile: acc = dS K_j for its kDqRows queries, from
// dS^T at sDS_w ([key][query], this warp's first query) and K_j at sK_c ([key][dim], the pass's first
// column), added to the workspace rows at `rows`. Column blocks at or past `cols_left` (outside
// head_dim) would add zeros and are skipped.
template <int NT>
__device__ __forceinline__ void dq_pass(float* rows, u32 sDS_w, u32 sK_c, int cols_left, int lane) {
    float acc[kDqMT][NT][4];
    zero(acc);
    warp_mma<kDqMT, NT, kN / 16, kDQUnroll, false, false>(acc, sDS_w, kPRowBytes, sK_c, kRowBytes, lane);
#pragma unroll
    for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
        for (int np = 0; np < NT / 2; ++np)
            if (np * 16 < cols_left) add_dq_block<kHeadDim>(rows + mt * 16 * kHeadDim + np * 16, acc[mt][2 * np], acc[mt][2 * np + 1], lane);
}

}  // namespace bwd_kv
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::bwd_kv;

// Grid and work of a CTA: attn/schedule.cuh's kv_work. With p.f32_out its partial sums of dK
// (already scaled) and dV go to a float32 workspace indexed by split, summed later in a fixed order;
// otherwise straight to dk and dv.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS) flash_bwd_dkdv(const __grid_constant__ BwdParams p) {
    const FwdParams& f = p.fwd;
    const int head_dim = f.head_dim, head_dim_v = f.head_dim_v;
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = smem_addr(smem);
    const u32 sK = s_base, sV = s_base + kOffV, sP = s_base + kOffP, sDS = s_base + kOffDS;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // This warp's tiles: keys n_sdp.., queries m_sdp.. (phase 1); keys n_kv.., dims d_kv.. (dK/dV);
    // queries m_dq.., dims d_dq.. (dQ).
    const int n_sdp = (warp % WARPS_N_SDP) * kSdpRows, m_sdp = (warp / WARPS_N_SDP) * kSdpCols;
    const int n_kv = (warp % WARPS_N_DKV) * kKvRows, d_kv = (warp / WARPS_N_DKV) * kKvCols;
    const int m_dq = (warp % WARPS_M_DQ) * kDqRows, d_dq = (warp / WARPS_M_DQ) * kDqCols;

    const Seq seq = Seq::of(f, kv_batch(p));
    const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
    const Mask mask = Mask::of(f, seq);
    const KvWork work = kv_work<kN, kM>(p, mask);
    const i64 b = work.b;
    const int h_kv = work.h_kv, key0 = work.key0;
    // The grid covers the longest sequence of a ragged batch: the shorter ones' key tiles past their
    // end have no rows (padding rows are the launcher's).
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

    load_tile<kN>(sK, tk, key0, seqlen_k, head_dim, vec, tid);
    load_tile<kN>(sV, tv, key0, seqlen_k, head_dim_v, vec, tid);
    KvStep cur = work.first();
    if (work.n_iter > 0) load_stream(cur, 0);
    cp_async_commit();

    float acc_dk[kKvMT][kKvNT][4], acc_dv[kKvMT][kKvNT][4];
    zero(acc_dk);
    zero(acc_dv);

#pragma unroll 1
    for (int it = 0; it < work.n_iter; ++it) {
        const int stage = kStages == 2 ? it & 1 : 0;
        cp_async_wait<0>();
        // Tile `it` has landed for every thread; every warp is done with tile it-1 (its stage is
        // refilled below when double buffered) and with P^T, dS^T of it-1 (overwritten in phase 1).
        __syncthreads();
        const KvStep next = work.next(cur);
        if (kStages == 2 && it + 1 < work.n_iter) load_stream(next, stage ^ 1);
        cp_async_commit();

        const int h = cur.h;
        const int i0 = cur.m * kM;
        cur = next;
        const u32 sQ = s_base + kOffQ + stage * kQueryTileBytes;
        const u32 sdO = s_base + kOffDO + stage * kQueryTileBytes;
        const u32 sL2 = s_base + kOffL2 + stage * kVecBytes;
        const u32 sD = s_base + kOffD + stage * kVecBytes;

        // Phase 1. P^T = exp2(logit^T - L2) with S^T = K_j Q_i^T, for this warp's keys n_sdp.. and
        // queries m_sdp.. of the tile.
        {
            const ScoreMod mod = ScoreMod::of(f, b, h);
            float s[kSdpMT][kSdpNT][4];
            zero(s);
            warp_mma<kSdpMT, kSdpNT, kHeadDim / 16, kKKUnroll, true, true>(s, sK + n_sdp * kRowBytes, kRowBytes,
                                                                          sQ + m_sdp * kRowBytes, kRowBytes, lane);
            // Warp tiles wholly inside the mask's band need no mask (nor do those past Sq, where
            // L2 = +inf makes P = 0).
            const int q0 = i0 + m_sdp, q1 = q0 + kSdpCols < seqlen_q ? q0 + kSdpCols : seqlen_q;
            const int k0 = key0 + n_sdp;
            const bool masked = q1 > q0 && !mask.full(q0, q1, k0, k0 + kSdpRows);
            // L2 (and below D) of this lane's query columns m_sdp + nt * 8 + 2t, +1.
            const u32 col_lane = (m_sdp + 2 * t) * 4;
            float2 l2c[kSdpNT];
#pragma unroll
            for (int nt = 0; nt < kSdpNT; ++nt) l2c[nt] = lds_f32x2(sL2 + col_lane + nt * 32);
#pragma unroll
            for (int mt = 0; mt < kSdpMT; ++mt)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    // Key k of this row is seen by the warp tile's queries lo..hi (columns).
                    const i64 key = k0 + mt * 16 + g + half * 8;
                    int lo = 0, hi = kSdpCols;
                    if (masked) mask.queries_of_key(key, q0, kSdpCols, lo, hi);
                    const float dist0 = kAlibi ? static_cast<float>(q0 + mask.offset - key) : 0.f;
#pragma unroll
                    for (int nt = 0; nt < kSdpNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int col = nt * 8 + 2 * t + e;
                            float& x = s[mt][nt][half * 2 + e];
                            const float pe = p_from_lse(mod.logit2(x, dist0 + static_cast<float>(col)),
                                                        e ? l2c[nt].y : l2c[nt].x);
                            x = col < lo || col > hi ? 0.f : pe;
                        }
                }
            store_tile16(s, sP + n_sdp * kPRowBytes + m_sdp * 2, kPRowBytes, lane);

            // dS^T = P^T o (dP^T - D) with dP^T = V_j dO_i^T, from the float32 P.
            float dp[kSdpMT][kSdpNT][4];
            zero(dp);
            warp_mma<kSdpMT, kSdpNT, kHeadDim / 16, kKKUnroll, true, true>(dp, sV + n_sdp * kRowBytes, kRowBytes,
                                                                           sdO + m_sdp * kRowBytes, kRowBytes, lane);
#pragma unroll
            for (int nt = 0; nt < kSdpNT; ++nt) {
                const float2 dc = lds_f32x2(sD + col_lane + nt * 32);
#pragma unroll
                for (int mt = 0; mt < kSdpMT; ++mt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = nt * 8 + 2 * t + (e & 1);
                        const i64 key = k0 + mt * 16 + g + (e >> 1) * 8;
                        const float dist = kAlibi ? static_cast<float>(q0 + col + mask.offset - key) : 0.f;
                        const float pe = s[mt][nt][e];
                        dp[mt][nt][e] = pe * (dp[mt][nt][e] - ((e & 1) ? dc.y : dc.x)) *
                                        mod.dlogit(pe, (e & 1) ? l2c[nt].y : l2c[nt].x, dist);
                    }
            }
            store_tile16(dp, sDS + n_sdp * kPRowBytes + m_sdp * 2, kPRowBytes, lane);
        }
        // P^T and dS^T of the whole tile are in shared memory.
        __syncthreads();

        // Phase 2. dV_j += P^T dO_i, dK_j += dS^T Q_i (scaled once at the end).
        auto product_dv = [&] {
            warp_mma<kKvMT, kKvNT, kM / 16, kM / 16, true, false>(acc_dv, sP + n_kv * kPRowBytes, kPRowBytes,
                                                                 sdO + d_kv * 2, kRowBytes, lane);
        };
        auto product_dk = [&] {
            warp_mma<kKvMT, kKvNT, kM / 16, kM / 16, true, false>(acc_dk, sDS + n_kv * kPRowBytes, kPRowBytes,
                                                                 sQ + d_kv * 2, kRowBytes, lane);
        };
        // dQ_i += dS K_j: dS is the transpose of the staged dS^T [key][query]; K_j is [key][dim].
        // Column blocks past head_dim would add zeros and are skipped; passes of at most 64 columns
        // keep the partial sums small beside dK and dV.
        auto product_dq = [&] {
            if constexpr (kDQAtomic) {
                if (d_dq >= head_dim) return;
                float* const dq_rows = p.dq_accum + (ws_row0(p, seq, b, h) + i0 + m_dq) * kHeadDim + d_dq;
#pragma unroll
                for (int c0 = 0; c0 + 64 <= kDqCols; c0 += 64)
                    dq_pass<8>(dq_rows + c0, sDS + m_dq * 2, sK + (d_dq + c0) * 2, head_dim - d_dq - c0, lane);
                if constexpr (kDqTailNT > 0) {
                    constexpr int c0 = kDqCols - kDqCols % 64;
                    dq_pass<kDqTailNTOr2>(dq_rows + c0, sDS + m_dq * 2, sK + (d_dq + c0) * 2, head_dim - d_dq - c0,
                                          lane);
                }
            }
        };
        // dQ last: moving it (and its reductions) ahead of dK or dV measured 4-7 % slower.
        product_dv();
        product_dk();
        product_dq();
        if (kStages == 1 && it + 1 < work.n_iter) {
            __syncthreads();  // every warp is done reading Q_i and dO_i
            load_stream(next, 0);
            cp_async_commit();
        }
    }
    cp_async_wait<0>();

    const int row0 = key0 + n_kv;
    const int out_bytes = p.f32_out ? 4 : 2;
    char* const dk_base = static_cast<char*>(p.dk) +
                          (work.split * p.dk_split + b * p.dk_st.b + h_kv * p.dk_st.h + seq.k0 * p.dk_st.s) * out_bytes;
    char* const dv_base = static_cast<char*>(p.dv) +
                          (work.split * p.dv_split + b * p.dv_st.b + h_kv * p.dv_st.h + seq.k0 * p.dv_st.s) * out_bytes;
    store_acc<Elem>(acc_dk, f.scale, dk_base, p.dk_st.s, p.dk_st.d, row0, seqlen_k, d_kv, head_dim, p.f32_out != 0, lane);
    store_acc<Elem>(acc_dv, 1.f, dv_base, p.dv_st.s, p.dv_st.d, row0, seqlen_k, d_kv, head_dim_v, p.f32_out != 0, lane);
}
