// FlashAttention forward on sm_90a: O = softmax(logits) V and LSE with TMA loads, a shared-memory
// ring of K_j/V_j tiles and warpgroup MMA (core/tma.cuh, core/wgmma.cuh). Same mathematics,
// parameters, grid and outputs as fwd_sm80.cu; the launcher is cuflash/_cuda/forward_sm90.py.
//
// A CTA owns the BLOCK_M x d tile Q_i of one (batch, query head) and is three warpgroups:
//   warpgroup 0, the producer: one thread issues the TMA copies, Q_i once, then K_j and V_j of every
//     key tile the mask lets Q_i see into a ring of STAGES slots. Slot s has three mbarriers:
//     full_k[s] and full_v[s] complete when the copies land (expected transaction bytes), empty[s]
//     when every consumer warp is done reading the slot. It keeps 24 registers (setmaxnreg).
//   warpgroups 1 and 2, the consumers: warpgroup c owns rows 64(c-1) .. 64(c-1)+63 of Q_i and runs,
//     per key tile,  S = Q_c K_j^T  (wgmma, both operands in shared memory),  the logits, mask and
//     online softmax in registers (attn/score_mod.cuh, attn/mask.cuh, attn/softmax.cuh),  and
//     O_c += P V_j  (wgmma with P as the register A operand: its accumulator layout packs to 16 bits
//     in place). They take 240 registers.
// The two consumers run independently; each waits for its own products before the next step. The
// ping-pong between consumer warpgroups (one's softmax under the other's products) and the overlap
// inside a warpgroup (S of the next tile issued before the softmax of this one) are not done yet.
//
// Shared memory (Swizzle128 tiles, wgmma.cuh: 64-column blocks of 128-byte rows, chunk c of row r
// at c ^ (r % 8); the TMA copies' 128-byte swizzle writes exactly that): Q_i, then STAGES K_j
// tiles, then STAGES V_j tiles, from a 1024-byte-aligned base (the launcher adds 1024 bytes). A copy
// is one box of 64 head-dim columns by BLOCK_M or BLOCK_N rows; rows past Sq or Sk and columns past
// D or Dv land as zeros, so tails need no code in the products (the mask hides keys past Sk).
// The epilogue stages each consumer's O rows, normalised and rounded, in its own rows of Q_i (only
// it reads them) and writes them out as 16-byte chunks.
//
// Configuration (#define lines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM  64 or 128: bucket of max(D, Dv)       BLOCK_M 128 (two consumers of 64 rows)
//   BLOCK_N   128 keys per tile                     STAGES  slots of the K_j/V_j ring (2..3)
//   DTYPE     1 float16, 2 bfloat16                 SCORE_MODS  score modifiers (attn/score_mod.cuh)
//   SMEM_BYTES  the launcher's dynamic shared memory, checked against the layout below
//
// Logits are log2(e) * mod(scale * q_i . k_j) on the keys the mask lets query i see. A row that sees
// no key gets O = 0 and LSE = -inf; LSE is the natural log of sum_j exp(logit_ij).
#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/elem.cuh"
#include "../core/tma.cuh"
#include "../core/wgmma.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(STAGES) || !defined(SMEM_BYTES)
#error "fwd_sm90.cu needs HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, SMEM_BYTES"
#endif

namespace cuflash {
namespace fwd_wg {

static_assert(!kIsF32 && !kIsF64, "fwd_sm90.cu is a 16-bit kernel: DTYPE must be 1 (float16) or 2 (bfloat16)");

constexpr int kHeadDim = HEAD_DIM;
constexpr int kM = BLOCK_M;
constexpr int kN = BLOCK_N;
constexpr int kStages = STAGES;
constexpr int kConsumers = kM / 64;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kColBlocks = kHeadDim / 64;  // 64-column swizzle blocks (and TMA boxes) per tile
constexpr int kNTiles = kN / 8;            // n8 fragments of S per consumer warp
constexpr int kDTiles = kHeadDim / 8;      // n8 fragments of O
constexpr int kChunks = kHeadDim / 8;      // 16-byte chunks of an O row

constexpr int kQBytes = kM * kHeadDim * 2;
constexpr int kKVBytes = kN * kHeadDim * 2;
constexpr int kOffK = kQBytes;
constexpr int kOffV = kOffK + kStages * kKVBytes;
constexpr int kSmemBytes = kOffV + kStages * kKVBytes + 1024;
// The ring's mbarriers: Q_i's, then full_k, full_v and empty of each slot.
constexpr int kBarriers = 1 + 3 * kStages;

// setmaxnreg: 24 x 128 + 240 x 256 = 64512 of the SM's 65536 registers (one CTA per SM), the
// producer's share moved to the consumers (FlashAttention-3's split for two consumer warpgroups).
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;

static_assert(kHeadDim == 64 || kHeadDim == 128, "HEAD_DIM must be 64 or 128 (whole swizzle blocks; wgmma N of O)");
static_assert(kM == 128, "BLOCK_M must be 128: two consumer warpgroups of 64 rows");
static_assert(kN == 128, "BLOCK_N must be 128 (the N of the S product and the box rows of K_j, V_j)");
static_assert(kStages >= 2 && kStages <= 3, "STAGES must be 2 or 3");
static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536, "setmaxnreg split exceeds the SM's registers");
static_assert(kSmemBytes + 8 * kBarriers <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");

using Softmax = SoftmaxState<1, kNTiles, kDTiles>;

struct Barriers {
    u32 base;
    __device__ __forceinline__ u32 q() const { return base; }
    __device__ __forceinline__ u32 full_k(int s) const { return base + 8 * (1 + s); }
    __device__ __forceinline__ u32 full_v(int s) const { return base + 8 * (1 + kStages + s); }
    __device__ __forceinline__ u32 empty(int s) const { return base + 8 * (1 + 2 * kStages + s); }
};

// The producer: one thread. Key tiles run from the last the CTA needs (n_last) down, as the
// consumers take them.
__device__ __forceinline__ void produce(const FwdSm90Params& p, const QWork& w, int row0, int n_last, int n_tiles,
                                        u32 s_base, Barriers bar) {
    tma::prefetch_map(&p.q_map);
    tma::prefetch_map(&p.k_map);
    tma::prefetch_map(&p.v_map);
    const int b = static_cast<int>(w.b);
    tma::mbar_arrive_expect_tx(bar.q(), kQBytes);
#pragma unroll
    for (int cb = 0; cb < kColBlocks; ++cb) tma::load_4d(s_base + cb * kM * 128, &p.q_map, cb * 64, row0, w.h, b, bar.q());
#pragma unroll 1
    for (int it = 0; it < n_tiles; ++it) {
        const int s = it % kStages;
        const u32 round = static_cast<u32>(it / kStages);
        // The slot's previous tile has been read by every consumer warp (the first round passes).
        tma::mbar_wait(bar.empty(s), (round & 1u) ^ 1u);
        const int n0 = (n_last - it) * kN;
        const u32 sK = s_base + kOffK + s * kKVBytes, sV = s_base + kOffV + s * kKVBytes;
        tma::mbar_arrive_expect_tx(bar.full_k(s), kKVBytes);
#pragma unroll
        for (int cb = 0; cb < kColBlocks; ++cb) tma::load_4d(sK + cb * kN * 128, &p.k_map, cb * 64, n0, w.h_kv, b, bar.full_k(s));
        tma::mbar_arrive_expect_tx(bar.full_v(s), kKVBytes);
#pragma unroll
        for (int cb = 0; cb < kColBlocks; ++cb) tma::load_4d(sV + cb * kN * 128, &p.v_map, cb * 64, n0, w.h_kv, b, bar.full_v(s));
    }
}

// Loop-invariant inputs of a consumer's tile_step.
struct TileLoop {
    u32 s_base;
    Barriers bar;
    int q_row;  // this warpgroup's first row in the Q_i tile (0 or 64)
    int n_last, seqlen_k, lane;
    ScoreMod mod;
};

// The register A operand of P V: k16 step kk packs n8 tiles 2kk, 2kk + 1 of P to 16 bits.
__device__ __forceinline__ void pack_p(u32 (&a)[kN / 16][4], const float (&x)[kNTiles][4]) {
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
        a[kk][0] = pack2<Elem>(x[2 * kk][0], x[2 * kk][1]);
        a[kk][1] = pack2<Elem>(x[2 * kk][2], x[2 * kk][3]);
        a[kk][2] = pack2<Elem>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        a[kk][3] = pack2<Elem>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
    }
}

// One K_j/V_j tile of a consumer warpgroup: S = Q_c K_j^T, logits, online softmax, O_c += P V_j,
// then the slot goes back to the producer. MASKED is a template parameter so that the tiles wholly
// inside the mask's band carry no masking code. row_w is this thread's first row (g of its warp's
// m16 block) and band the keys of its rows, as in fwd_sm80.cu.
template <bool MASKED>
__device__ __forceinline__ void tile_step(const TileLoop& c, int it, i64 row_w, i64 mask_offset,
                                          const Mask::RowBand& band, Softmax& state, float (&acc_o)[1][kDTiles][4]) {
    const int s = it % kStages;
    const u32 parity = static_cast<u32>(it / kStages) & 1u;
    // Addresses and descriptors from a fresh base, computed where used rather than held across
    // the loop.
    const u32 base = fresh(c.s_base);
    const u32 sQ = base, sK = base + kOffK + s * kKVBytes, sV = base + kOffV + s * kKVBytes;

    float sc[1][kNTiles][4];
    tma::mbar_wait(c.bar.full_k(s), parity);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
        wg::mma_ss<Elem, kN, 0, 0>(sc[0], wg::k_major<kM>(sQ, c.q_row, kk), wg::k_major<kN>(sK, 0, kk), kk > 0);
    wg::commit();
    wg::wait<0>();
    wg::pin(sc[0]);

    // Logits in the log2 domain where a score modifier or the mask needs them (masked keys -inf);
    // plain unmasked tiles leave the scaling to the softmax's exp2. This lane's columns are
    // col0 + nt * 8 + e, e in {0, 1}; its rows row_w and row_w + 8.
    const int col0 = (c.n_last - it) * kN + 2 * (c.lane & 3);
    const float dist_w = kAlibi ? static_cast<float>(row_w + mask_offset - col0) : 0.f;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int d = hh * 8;
        if constexpr (kScoreMods) {
            const float dist0 = dist_w + static_cast<float>(d);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = sc[0][nt][2 * hh + e];
                    x = c.mod.logit2(x, dist0 - static_cast<float>(nt * 8 + e));
                }
        } else if constexpr (MASKED) {
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) sc[0][nt][2 * hh + e] *= c.mod.scale_log2;
        }
        if constexpr (MASKED) {
            const int lo = band.first(d) - col0, hi = band.last(d, c.seqlen_k) - col0;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (nt * 8 + e < lo || nt * 8 + e > hi) sc[0][nt][2 * hh + e] = neg_inf();
        }
    }
    state.update<MASKED || kScoreMods>(sc, acc_o, c.mod.scale_log2);

    u32 p16[kN / 16][4];
    pack_p(p16, sc[0]);
    tma::mbar_wait(c.bar.full_v(s), parity);
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) wg::mma_rs<Elem, kHeadDim, 1>(acc_o[0], p16[kk], wg::mn_major<kN>(sV, 0, kk), 1);
    wg::commit();
    wg::wait<0>();
    wg::pin(acc_o[0]);
    wg::pin(p16);
    // This warp's products have read K_j and V_j: one arrival per consumer warp frees the slot.
    __syncwarp();
    if (c.lane == 0) tma::mbar_arrive(c.bar.empty(s));
}

}  // namespace fwd_wg
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::fwd_wg;

// Grid: attn/schedule.cuh's q_work over p.fwd.num_m_blocks query tiles per (batch, head), kThreads
// threads, SMEM_BYTES of dynamic shared memory, one CTA per SM.
extern "C" __global__ void __launch_bounds__(kThreads, 1) flash_fwd_sm90(const __grid_constant__ FwdSm90Params p) {
    const FwdParams& f = p.fwd;
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) unsigned long long barriers[kBarriers];
    const u32 s_base = (smem_addr(smem) + 1023u) & ~1023u;
    const Barriers bar{smem_addr(barriers)};

    const int tid = threadIdx.x;
    const int group = tid >> 7;  // 0: producer; 1..kConsumers: consumers
    const QWork work = q_work(f.num_m_blocks, f.heads_q, f.group);
    const int row0 = work.tile * kM;
    const int row_end = row0 + kM < f.seqlen_q ? row0 + kM : f.seqlen_q;

    // The key tiles some row of Q_i sees, from the last to the first (the diagonal's first under a
    // causal mask): producer and consumers walk the same sequence.
    const Mask mask = Mask::of(f);
    const TileRange range = mask.key_tiles<kN>(row0, row_end);
    const int n_tiles = range.count(), n_last = range.end - 1;

    if (tid == 0) {
        tma::mbar_init(bar.q(), 1);
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            tma::mbar_init(bar.full_k(s), 1);
            tma::mbar_init(bar.full_v(s), 1);
            tma::mbar_init(bar.empty(s), 4 * kConsumers);
        }
        tma::fence_mbar_init();
    }
    // The barriers are initialised before any thread waits on or arrives at them. No CTA-wide
    // barrier follows: the producer's idle threads leave.
    __syncthreads();

    if (group == 0) {
        tma::release_registers<kProducerRegs>();
        if (tid == 0) produce(p, work, row0, n_last, n_tiles, s_base, bar);
        return;
    }
    tma::claim_registers<kConsumerRegs>();

    const int cg = group - 1;  // consumer index: rows 64 cg .. 64 cg + 63 of Q_i
    const int ctid = tid - 128 * group;
    const int warp = ctid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int q_row = 64 * cg;
    const i64 b = work.b;
    const int h = work.h;
    const int seqlen_k = f.seqlen_k;

    float acc_o[1][kDTiles][4];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
    Softmax state;
    state.init();

    const i64 row_w = row0 + q_row + warp * 16 + g;
    const Mask::RowBand band = mask.row_band(row_w);
    const TileLoop loop{s_base, bar, q_row, n_last, seqlen_k, lane, ScoreMod::of(f, b, h)};
    // Q_i has landed (waited even without key tiles: its rows are reused to stage O below).
    tma::mbar_wait(bar.q(), 0);

    // Tiles wholly inside [full_lo, full_hi), the keys every row of the CTA sees, need no mask; in
    // descending order the masked ones come first, then the unmasked, then those across a window's
    // lower edge (fwd_sm80.cu walks them the same way).
    int full_lo, full_hi;
    mask.keys_of_all(row0, row_end, full_lo, full_hi);
    auto is_full = [&](int it) {
        const int n0 = (n_last - it) * kN;
        return n0 >= full_lo && n0 + kN <= full_hi;
    };
    for (int it = 0; it < n_tiles;) {
        for (; it < n_tiles && !is_full(it); ++it) tile_step<true>(loop, it, row_w, f.mask_offset, band, state, acc_o);
        for (; it < n_tiles && is_full(it); ++it) tile_step<false>(loop, it, row_w, f.mask_offset, band, state, acc_o);
    }

    // Finalize: O = acc / l_i, LSE_i = ln 2 * (m_i + log2 l_i). A row that sees no key (outside the
    // mask's live queries) writes O = 0 whatever V holds; a row that sees keys keeps the arithmetic,
    // 0/0 = NaN included when every logit it sees is -inf (fwd_sm80.cu's rule).
    int live_lo, live_hi;
    Mask::of(f).live_queries(live_lo, live_hi);
    float inv_l[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float l = quad_sum(state.l[0][hh]);
        const int row = static_cast<int>(row_w) + hh * 8;
        inv_l[hh] = 1.f / l;
        if (row < live_lo || row >= live_hi) {
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) acc_o[0][dt][2 * hh] = acc_o[0][dt][2 * hh + 1] = 0.f;
            inv_l[hh] = 0.f;
        }
        if (t == 0 && row < f.seqlen_q) {
            const float val = l > 0.f ? 0.6931471805599453f * (state.m[0][hh] + log2_approx(l)) : neg_inf();
            f.lse[b * f.lse_sb + h * f.lse_sh + row * f.lse_ss] = val;
        }
    }

    // Stage O_c in this warpgroup's rows of Q_i (Swizzle128 layout, 16-bit), once all four of its
    // warps are done with their products (the last ones read Q_i).
    const u32 sQ = s_base;
    tma::named_barrier(1 + cg, 128);
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = q_row + warp * 16 + g + hh * 8;
            const u32 addr = sQ + wg::swizzle128<kM>(r, dt) + t * 4;
            const u32 x = pack2<Elem>(acc_o[0][dt][2 * hh] * inv_l[hh], acc_o[0][dt][2 * hh + 1] * inv_l[hh]);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
        }
    // The staged rows are complete before the warpgroup's threads read across them.
    tma::named_barrier(1 + cg, 128);

    const int head_dim_v = f.head_dim_v;
    char* const o_base = static_cast<char*>(f.out) + (b * f.o_st.b + h * f.o_st.h) * 2;
    constexpr int kOutIters = 64 * kChunks / 128;
#pragma unroll
    for (int i = 0; i < kOutIters; ++i) {
        const int idx = ctid + i * 128;
        const int r = idx / kChunks, chunk = idx % kChunks;
        const int row = row0 + q_row + r;
        const int col0 = chunk * 8;
        if (row >= f.seqlen_q || col0 >= head_dim_v) continue;
        u32 w[4];
        lds_128(sQ + wg::swizzle128<kM>(q_row + r, chunk), w[0], w[1], w[2], w[3]);
        char* const o_row = o_base + static_cast<i64>(row) * f.o_st.s * 2;
        if (f.vec_out && col0 + 8 <= head_dim_v) {
            *reinterpret_cast<uint4*>(o_row + col0 * 2) = make_uint4(w[0], w[1], w[2], w[3]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (col0 + e < head_dim_v)
                    *reinterpret_cast<u16*>(o_row + static_cast<i64>(col0 + e) * f.o_st.d * 2) =
                        static_cast<u16>(w[e / 2] >> (16 * (e % 2)));
        }
    }
}
