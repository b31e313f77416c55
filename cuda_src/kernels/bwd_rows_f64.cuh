// The float64 backward by recomputation (FlashAttention-2 order, as bwd_rows.cuh states it):
//   dV_j += P_ij^T dO_i,   dP_ij = dO_i V_j^T,   dS_ij = P_ij o (dP_ij - D_i),
//   dK_j += scale * dS_ij^T Q_i,   dQ_i += scale * dS_ij K_j,   with D_i = rowsum(dO_i o O_i),
// every product on the FP64 tensor cores (core/dmma.cuh) and everything else in double.
//
// What the two kernels of bwd_dkdv_f64.cu and bwd_dq_f64.cu share, written for a warp that owns 16
// rows and streams tiles of columns; the organisation is bwd_rows.cuh's (the float32 kernels'), with
// the same defines. The including kernel defines ROLE:
//   ROLE 0, flash_bwd_dkdv: a CTA owns K_j, V_j (BLOCK_OWN keys) of one key/value head and streams
//     Q_i, dO_i (BLOCK_STREAM queries) of every query head of its share of the GQA group; the warp
//     computes S^T = K_j Q_i^T and dP^T = V_j dO_i^T, whose accumulator blocks are the A operands of
//     dV += P^T dO and dK += dS^T Q. With DQ_ATOMIC, dS^T is staged in shared memory and every warp
//     computes a share of dQ_i^T = K_j^T dS^T, added to a float64 workspace with atomics.
//   ROLE 1, flash_bwd_dq: a CTA owns Q_i, dO_i and streams K_j, V_j, accumulating dQ_i in registers
//     (the deterministic path).
//
// Configuration: HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, NUM_WARPS, SPLIT_D, STAGES (1 or 2 streamed tiles
// in flight), MIN_BLOCKS, KK_UNROLL (16-column blocks of S and dP unrolled at a time), DQ_ATOMIC,
// SPLIT_STREAM (0: float32 only), SMEM_BYTES, DTYPE (4), SCORE_MODS, SEQ_MODE. L2 (+inf on rows that see no
// key and on the padding rows) and D come from bwd_aux.cu's preprocess, in double.
#pragma once

#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/dmma.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"

#if !defined(ROLE) || !defined(HEAD_DIM) || !defined(BLOCK_OWN) || !defined(BLOCK_STREAM) || !defined(NUM_WARPS) || \
    !defined(SPLIT_D) || !defined(STAGES) || !defined(MIN_BLOCKS) || !defined(KK_UNROLL) || !defined(DQ_ATOMIC) || \
    !defined(SPLIT_STREAM) || !defined(SMEM_BYTES)
#error "bwd_rows_f64.cuh needs ROLE, HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, NUM_WARPS, SPLIT_D, STAGES, MIN_BLOCKS, KK_UNROLL, DQ_ATOMIC, SPLIT_STREAM, SMEM_BYTES"
#endif

namespace cuflash {
namespace bwd64 {

constexpr bool kKeyRows = ROLE == 0;  // rows are keys (dK/dV kernel) or queries (dQ kernel)
constexpr bool kDQAtomic = ROLE == 0 && DQ_ATOMIC != 0;
constexpr int kHeadDim = HEAD_DIM;
constexpr int kOwn = BLOCK_OWN;
constexpr int kStream = BLOCK_STREAM;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr int kSplitD = SPLIT_D;
constexpr int kStages = STAGES;
constexpr int kKUnroll = KK_UNROLL;
constexpr int kRowGroups = kWarps / kSplitD;     // 16-row groups of the owned tile
constexpr int kAccCols = kHeadDim / kSplitD;     // accumulator columns per warp
constexpr int kAccTiles = kAccCols / 8;          // n8 blocks of dK/dV (or dQ) per warp
constexpr int kColTiles = kStream / 8;           // n8 blocks of S/dP per warp
constexpr int kRowBytes = kHeadDim * 8 + 16;     // one 16-byte pad per row (core/dmma.cuh)
constexpr int kOwnTileBytes = kOwn * kRowBytes;
constexpr int kStreamTileBytes = kStream * kRowBytes;
constexpr int kVecBytes = kKeyRows ? kStream * 8 : 0;      // L2 or D of one streamed query tile
constexpr int kDSRowBytes = kStream * 8 + 16;              // dS^T staging row: 16 mod 64 (core/dmma.cuh)
constexpr int kDSBytes = kDQAtomic ? kOwn * kDSRowBytes : 0;  // one of two dS^T buffers
// Shared memory: owned A (K_j | Q_i), owned B (V_j | dO_i), kStages streamed A tiles, kStages
// streamed B tiles, kStages L2 vectors, kStages D vectors, two dS^T buffers.
constexpr int kOffOwnB = kOwnTileBytes;
constexpr int kOffStreamA = 2 * kOwnTileBytes;
constexpr int kOffStreamB = kOffStreamA + kStages * kStreamTileBytes;
constexpr int kOffL2 = kOffStreamB + kStages * kStreamTileBytes;
constexpr int kOffD = kOffL2 + kStages * kVecBytes;
constexpr int kOffDS = kOffD + kStages * kVecBytes;
constexpr int kSmemBytes = kOffDS + 2 * kDSBytes;
// dQ_i^T += K_j^T dS^T (DQ_ATOMIC): the (dim, query) output is cut into 16-dim blocks, every
// kWarps-th one to a warp, one block (kStream accumulator registers) at a time.
constexpr int kDQBlocks = kHeadDim / 16;
constexpr int kDQPasses = (kDQBlocks + kWarps - 1) / kWarps;

static_assert(kIsF64, "bwd_rows_f64.cuh is the float64 backward (DTYPE 4)");
static_assert(ROLE == 0 || ROLE == 1, "ROLE must be 0 (dK/dV) or 1 (dQ)");
static_assert(ROLE == 0 || DQ_ATOMIC == 0, "DQ_ATOMIC belongs to the dK/dV kernel");
static_assert(SPLIT_STREAM == 0, "SPLIT_STREAM belongs to the float32 dK/dV kernel");
static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16 && kWarps % kSplitD == 0, "NUM_WARPS must be a multiple of SPLIT_D, at most 16");
static_assert(kOwn == 16 * kRowGroups, "BLOCK_OWN must be 16 rows per warp row group (16 * NUM_WARPS / SPLIT_D)");
static_assert(kAccCols % 8 == 0, "HEAD_DIM / SPLIT_D must be a multiple of 8");
static_assert(kStream % 8 == 0 && kStream <= 128, "BLOCK_STREAM must be a multiple of 8, at most 128");
static_assert(128 % kOwn == 0 && 128 % kStream == 0, "tile sizes must divide the 128-row padding of L2 and D");
static_assert(kStages == 1 || kStages == 2, "one streamed tile at a time, or two (double buffering)");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");

using Mod = ScoreModOf<double>;
using Params = BwdParamsOf<double>;

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid,
                                          int row_lo = 0) {
    cuflash::load_tile<ROWS, kHeadDim, 8, kThreads, PaddedRows<kRowBytes>>(smem, t, row0, nrows, ncols, vec, tid, row_lo);
}

// acc = A_w B^T over all HEAD_DIM columns: the 16 rows of A_w (this warp's owned rows) by the
// kStream rows of a streamed tile B.
__device__ __forceinline__ void product_rows_by_rows(double (&acc)[1][kColTiles][4], u32 sA_w, u32 sB, int lane) {
    dmma_rows_by_rows<1, kColTiles, kHeadDim, kRowBytes, kKUnroll>(acc, sA_w, sB, lane);
}

// acc += X_w B[:, col0 ..] with X_w (16 x kStream) in registers and B a streamed (or owned) tile
// from its column col0 (sB points there).
__device__ __forceinline__ void product_regs_by_tile(double (&acc)[1][kAccTiles][4], const double (&x)[1][kColTiles][4],
                                                     u32 sB, int lane) {
    dmma_regs_by_tile<1, kColTiles, kAccTiles, kRowBytes>(acc, x, sB, lane);
}

// The ALiBi distance i + offset - j of column `col`, from that of column 0.
__device__ __forceinline__ double col_dist(double dist0, int col) {
    return kKeyRows ? dist0 + static_cast<double>(col) : dist0 - static_cast<double>(col);
}

template <int N>
__device__ __forceinline__ void zero(double (&x)[1][N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[0][i][e] = 0.0;
}

// Turns the scores x (16 rows x kStream columns) into P = exp2(logit - L2) in place; l2_of(row
// half, column) supplies L2 of the query of that entry, dist0[h] the ALiBi distance of column 0 in
// row half h. With `mask`, the columns of row half h outside [lo[h], hi[h]] get P = 0 exactly.
template <typename L2Of>
__device__ __forceinline__ void scores_to_p(double (&x)[1][kColTiles][4], const Mod& mod, bool mask,
                                            const int (&lo)[2], const int (&hi)[2], const double (&dist0)[2],
                                            L2Of l2_of, int lane) {
    const int t = lane & 3;
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = ct * 8 + 2 * t + (e & 1), h = e >> 1;
            double p = p_from_lse(mod.logit2(x[0][ct][e], col_dist(dist0[h], col)), l2_of(h, col));
            if (mask && (col < lo[h] || col > hi[h])) p = 0.0;
            x[0][ct][e] = p;
        }
}

}  // namespace bwd64
}  // namespace cuflash
