// FlashAttention forward in float64: O = softmax(logits) V and LSE, with float64 products on the
// FP64 tensor cores (core/dmma.cuh), float64 accumulation, softmax (attn/softmax.cuh's SoftmaxState
// on doubles) and LSE. One CTA per Br x d tile Q_i of one (batch, query head), streaming the K_j, V_j
// tiles it needs (attn/mask.cuh) through shared memory, double buffered by cp.async (as
// fwd_sm80.cu, whose structure this follows).
//
// Configuration (#define lines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM    bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_M     Br, rows of Q per CTA        BLOCK_N   Bc, keys per K_j/V_j tile
//   NUM_WARPS   warps per CTA: BLOCK_M / (16 * rows per warp) row groups times SPLIT_D
//   SPLIT_D     warps sharing one row group, each accumulating HEAD_DIM / SPLIT_D columns of O_i
//               (large head dims: O_i of all columns would not fit in registers); each of them
//               computes the row group's S and softmax itself
//   MIN_BLOCKS  CTAs per SM promised to the register allocator (__launch_bounds__)
//   MAX_REGS    if > 0, a register cap per thread used instead of MIN_BLOCKS (__maxnreg__)
//   VEC_LOAD    1: 16-byte cp.async tile loads; 0: element loads with any strides
//   DTYPE       4 (float64)     SCORE_MODS  attn/score_mod.cuh     SMEM_BYTES  checked below
//   SEQ_MODE    0 dense, 1 ragged (attn/seqlen.cuh)
//
// Logits are log2(e) * mod(scale * q_i . k_j) in double; P = exp2(logit - m_i) uses the CUDA math
// library's double exp2 (there is no fast exp2 for double). A row that sees no key gets O = 0 and
// LSE = -inf.
#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/dmma.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(NUM_WARPS) || !defined(SPLIT_D) || \
    !defined(MIN_BLOCKS) || !defined(MAX_REGS) || !defined(VEC_LOAD) || !defined(SMEM_BYTES)
#error "fwd_f64.cu needs HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, SPLIT_D, MIN_BLOCKS, MAX_REGS, VEC_LOAD, SMEM_BYTES"
#endif

namespace cuflash {
namespace fwd64 {

static_assert(kIsF64, "fwd_f64.cu is the float64 forward (DTYPE 4)");
constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kSplitD = SPLIT_D;
constexpr int kRowGroups = kWarps / kSplitD;
constexpr int kWarpRows = kBlockM / kRowGroups;
constexpr int kMTiles = kWarpRows / 16;          // m16 blocks per warp
constexpr int kNTiles = kBlockN / 8;             // n8 blocks of S
constexpr int kAccCols = kHeadDim / kSplitD;     // columns of O_i per warp
constexpr int kDTiles = kAccCols / 8;            // n8 blocks of O_i per warp
constexpr int kRowBytes = kHeadDim * 8 + 16;     // one 16-byte pad per row (core/dmma.cuh)
constexpr int kQBytes = kBlockM * kRowBytes;
constexpr int kKVTileBytes = kBlockN * kRowBytes;
constexpr int kStages = 2;
// Shared memory: [Q_i][K_j stage 0][K_j stage 1][V_j stage 0][V_j stage 1].
constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVTileBytes;
// The 16-column blocks of S = Q_i K_j^T unrolled at a time: the loads of an unrolled block hold
// (4 * kMTiles + 2 * kNTiles) * 2 registers each.
constexpr int kQKUnroll = kHeadDim <= 64 ? kHeadDim / 16 : 2;

static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16 && kWarps % kSplitD == 0, "NUM_WARPS must be a multiple of SPLIT_D, at most 16");
static_assert(kBlockM % (16 * kRowGroups) == 0 && kMTiles >= 1 && kMTiles <= 4,
              "BLOCK_M must be 16, 32, 48 or 64 rows per warp row group");
static_assert(kAccCols % 8 == 0, "HEAD_DIM / SPLIT_D must be a multiple of 8");
static_assert(kBlockN % 8 == 0 && kBlockN >= 8, "BLOCK_N must be a multiple of 8 (two k4 steps of P V each)");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, int tid) {
    cuflash::load_tile<ROWS, kHeadDim, 8, kThreads, PaddedRows<kRowBytes>, VEC_LOAD != 0, 1>(smem, t, row0, nrows,
                                                                                             ncols, tid);
}

using Softmax = SoftmaxState<kMTiles, kNTiles, kDTiles, double>;
using Mod = ScoreModOf<double>;
using Params = FwdParamsOf<double>;

// Loop-invariant inputs of tile_step. Tiles run from the last the CTA needs (n_last) down.
struct TileLoop {
    u32 sQ_warp, sKV, v_col;  // this warp's Q_i rows; K stages then V stages; byte offset of its O columns
    Tensor tk, tv;
    int n_last, n_tiles, seqlen_k, head_dim, head_dim_v, tid, lane;
    Mod mod;
    i64 mask_offset;  // the sequence's (ragged batches; dense ones read p.mask_offset)
};

// One K_j/V_j tile: S = Q_i K_j^T, logits, online softmax, O_i += P V_j. MASKED is a template
// parameter so the tiles wholly inside the mask's band carry no masking code. row_w is this thread's
// first row (g of its warp's first m16 block), band the keys of its rows.
template <bool MASKED>
__device__ __forceinline__ void tile_step(const Params& p, const TileLoop& c, int it, int& stage, i64 row_w,
                                          const Mask::RowBand& band, Softmax& state,
                                          double (&acc_o)[kMTiles][kDTiles][4]) {
    cp_async_wait<kStages - 2>();
    // Tile `it` (and Q_i) has landed for every thread, and every warp is done with tile it-1, whose
    // stage the load below refills.
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < c.n_tiles) {
        const int nstage = stage == 0 ? kStages - 1 : stage - 1;
        const int n0 = (c.n_last - nxt) * kBlockN;
        load_tile<kBlockN>(c.sKV + nstage * kKVTileBytes, c.tk, n0, c.seqlen_k, c.head_dim, c.tid);
        load_tile<kBlockN>(c.sKV + (kStages + nstage) * kKVTileBytes, c.tv, n0, c.seqlen_k, c.head_dim_v, c.tid);
    }
    cp_async_commit();

    double s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0;
    dmma_rows_by_rows<kMTiles, kNTiles, kHeadDim, kRowBytes, kQKUnroll>(s, c.sQ_warp, c.sKV + stage * kKVTileBytes,
                                                                         c.lane);

    // Logits in the log2 domain where a score modifier or the mask needs them (masked keys -inf);
    // plain unmasked tiles leave the scaling to the softmax's exp2. This lane's columns are
    // col0 + nt * 8 + e, e in {0, 1}.
    const int col0 = (c.n_last - it) * kBlockN + 2 * (c.lane & 3);
    const double dist_w = kAlibi ? static_cast<double>(row_w + (kRagged ? c.mask_offset : p.mask_offset) - col0) : 0.0;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int d = mt * 16 + hh * 8;  // this row's offset from row_w
            if constexpr (kScoreMods) {
                const double dist0 = dist_w + static_cast<double>(d);
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        double& x = s[mt][nt][2 * hh + e];
                        x = c.mod.logit2(x, dist0 - static_cast<double>(nt * 8 + e));
                    }
            } else if constexpr (MASKED) {
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) s[mt][nt][2 * hh + e] *= c.mod.scale_log2;
            }
            if constexpr (MASKED) {
                const int lo = band.first(d) - col0, hi = band.last(d, c.seqlen_k) - col0;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (nt * 8 + e < lo || nt * 8 + e > hi) s[mt][nt][2 * hh + e] = Num<double>::neg_inf();
            }
        }

    state.update<MASKED || kScoreMods>(s, acc_o, c.mod.scale_log2);
    dmma_regs_by_tile<kMTiles, kNTiles, kDTiles, kRowBytes>(
        acc_o, s, c.sKV + (kStages + stage) * kKVTileBytes + c.v_col, c.lane);
    stage = stage + 1 == kStages ? 0 : stage + 1;
}

}  // namespace fwd64
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::fwd64;

#if MAX_REGS > 0
#define FLASH_FWD_BOUNDS __maxnreg__(MAX_REGS)
#else
#define FLASH_FWD_BOUNDS __launch_bounds__(kThreads, MIN_BLOCKS)
#endif

// Grid: attn/schedule.cuh's q_work over p.num_m_blocks query tiles per (batch, head).
extern "C" __global__ void FLASH_FWD_BOUNDS flash_fwd(const __grid_constant__ Params p) {
    extern __shared__ __align__(128) char smem[];
    const u32 sQ = smem_addr(smem);
    const u32 sKV = sQ + kQBytes;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int rg = warp % kRowGroups, ds = warp / kRowGroups;
    const QWork work = q_work(p.num_m_blocks, p.heads_q, p.group);
    const i64 b = work.b;
    const int h = work.h;
    const int row0 = work.tile * kBlockM;
    // A ragged batch's shorter sequences have no rows in the grid's later tiles (fwd_sm80.cu).
    const Seq seq = Seq::of(p, b);
    if (kRagged && row0 >= seq.seqlen_q) return;
    const int seqlen_q = seq.seqlen_q;
    const int row_end = row0 + kBlockM < seqlen_q ? row0 + kBlockM : seqlen_q;
    const int seqlen_k = seq.seqlen_k, head_dim = p.head_dim, head_dim_v = p.head_dim_v;

    const Tensor tq = Tensor::of(p.q, p.q_st, b, h, 8, seq.q0);
    const Tensor tk = Tensor::of(p.k, p.k_st, b, work.h_kv, 8, seq.k0);
    const Tensor tv = Tensor::of(p.v, p.v_st, b, work.h_kv, 8, seq.k0);

    // The key tiles some row of Q_i sees, run from the last to the first.
    const Mask mask = Mask::of(p, seq);
    const TileRange range = mask.key_tiles<kBlockN>(row0, row_end);
    const int n_tiles = range.count(), n_last = range.end - 1;

    load_tile<kBlockM>(sQ, tq, row0, seqlen_q, head_dim, tid);
    if (n_tiles > 0) {
        const int n0 = n_last * kBlockN;
        load_tile<kBlockN>(sKV, tk, n0, seqlen_k, head_dim, tid);
        load_tile<kBlockN>(sKV + kStages * kKVTileBytes, tv, n0, seqlen_k, head_dim_v, tid);
    }
    cp_async_commit();

    double acc_o[kMTiles][kDTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.0;
    Softmax state;
    state.init();

    const int g = lane >> 2, t = lane & 3;
    int stage = 0;
    const i64 row_w = row0 + rg * kWarpRows + g;
    const Mask::RowBand band = mask.row_band(row_w);
    const int acc_col0 = ds * kAccCols;
    const TileLoop loop{sQ + rg * kWarpRows * kRowBytes, sKV, static_cast<u32>(acc_col0 * 8), tk, tv, n_last, n_tiles,
                        seqlen_k, head_dim, head_dim_v, tid, lane, Mod::of(p, b, h), mask.offset};
    // Tiles wholly inside [full_lo, full_hi), the keys every row sees, need no mask; in descending
    // order the masked tiles come first, then the unmasked ones, then those across the band's lower
    // edge (fwd_sm80.cu).
    int full_lo, full_hi;
    mask.keys_of_all(row0, row_end, full_lo, full_hi);
    auto is_full = [&](int it) {
        const int n0 = (n_last - it) * kBlockN;
        return n0 >= full_lo && n0 + kBlockN <= full_hi;
    };
    for (int it = 0; it < n_tiles;) {
        for (; it < n_tiles && !is_full(it); ++it) tile_step<true>(p, loop, it, stage, row_w, band, state, acc_o);
        for (; it < n_tiles && is_full(it); ++it) tile_step<false>(p, loop, it, stage, row_w, band, state, acc_o);
    }
    cp_async_wait<0>();

    // Finalize: O_i = acc / l_i, LSE_i = ln 2 * (m_i + log2 l_i). A row that sees no key (outside
    // the mask's live queries) writes O = 0 whatever V holds (its P is 0, but 0 times a NaN would not
    // be); a row that does see keys keeps the arithmetic, 0/0 = NaN included when every logit it
    // sees is -inf. The SPLIT_D warps of a row group hold the same m_i, l_i; the first writes the LSE.
    // A ragged sequence's place and lengths are read again here rather than held in registers
    // across the loop (fwd_sm80.cu).
    const Seq seq_out = kRagged ? Seq::of(p, fresh(static_cast<u32>(b))) : seq;
    int live_lo, live_hi;
    Mask::of(p, seq_out).live_queries(live_lo, live_hi);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const double l = Num<double>::quad_sum(state.l[mt][hh]);
            const int row = row0 + rg * kWarpRows + mt * 16 + g + hh * 8;
            const bool no_key = row < live_lo || row >= live_hi;
            const double inv_l = 1.0 / l;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
                acc_o[mt][dt][2 * hh] = no_key ? 0.0 : acc_o[mt][dt][2 * hh] * inv_l;
                acc_o[mt][dt][2 * hh + 1] = no_key ? 0.0 : acc_o[mt][dt][2 * hh + 1] * inv_l;
            }
            if (ds == 0 && t == 0 && row < seq_out.seqlen_q) {
                const double val =
                    l > 0.0 ? 0.6931471805599453 * (state.m[mt][hh] + Num<double>::log2(l)) : Num<double>::neg_inf();
                p.lse[b * p.lse_sb + h * p.lse_sh + (static_cast<i64>(seq_out.q0) + row) * p.lse_ss] = val;
            }
        }
    // Each lane stores its own pairs: 8 rows x 4 lanes x 8 bytes per instruction fill whole 32-byte
    // sectors, as well coalesced as a staged store.
    char* const o_base = static_cast<char*>(p.out) + (b * p.o_st.b + h * p.o_st.h + seq_out.q0 * p.o_st.s) * 8;
    store_acc<double>(acc_o, 1.0, o_base, p.o_st.s, p.o_st.d, row0 + rg * kWarpRows, seq_out.seqlen_q, acc_col0, head_dim_v,
                      false, lane);
}
