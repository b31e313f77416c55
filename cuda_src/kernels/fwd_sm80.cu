// FlashAttention forward: O = softmax(scale * Q K^T) V and LSE, one CTA per Br x d tile Q_i of
// one (batch, query head), streaming K_j, V_j through shared memory (FlashAttention-2 layout).
//
// Configuration arrives as #define lines prepended by cuflash/_cuda/forward.py (one table there):
//   HEAD_DIM    bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_M     Br, rows of Q per CTA        BLOCK_N   Bc, keys per K_j/V_j tile
//   NUM_WARPS   warps per CTA (each owns BLOCK_M / NUM_WARPS consecutive rows)
//   STAGES      K_j/V_j tiles in flight through cp.async (2 = double buffering)
//   MIN_BLOCKS  CTAs per SM promised to the register allocator (__launch_bounds__)
//   MAX_REGS    if > 0, a register cap per thread used instead of MIN_BLOCKS (__maxnreg__)
//   VEC_LOAD    1: q, k, v rows are 16-byte aligned with unit stride along the head dim, loaded by
//               16-byte cp.async; 0: element loads with any strides (no copies of odd layouts)
//   DTYPE       1 float16, 2 bfloat16 (mma.m16n8k16), 3 float32 (3xTF32 mma.m16n8k8)
//   SPLIT_Q     float32 only: 1 splits Q_i once into big/small planes in shared memory (twice the
//               bytes of Q_i); 0 keeps Q_i as loaded and splits its fragments at every k8 step
//
// Visibility: query i sees key j iff j < Sk and (!causal or j <= i + causal_offset). A row that sees
// no key gets O = 0 and LSE = -inf. LSE is the natural log of sum_j exp(scale * q_i . k_j).
#include "common.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(NUM_WARPS) || !defined(STAGES) || \
    !defined(MIN_BLOCKS) || !defined(MAX_REGS) || !defined(DTYPE) || !defined(VEC_LOAD)
#error "flash_fwd.cu needs HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, STAGES, MIN_BLOCKS, MAX_REGS, DTYPE and VEC_LOAD defined"
#endif
#if DTYPE == 3 && !defined(SPLIT_Q)
#error "the float32 flash_fwd.cu needs SPLIT_Q defined"
#endif

namespace cuflash {
namespace fwd {

constexpr bool kIsF32 = DTYPE == 3;
#if DTYPE == 1
using Elem = Half;
constexpr bool kSplitQ = false;
#elif DTYPE == 2
using Elem = BFloat16;
constexpr bool kSplitQ = false;
#elif DTYPE == 3
using Elem = float;
constexpr bool kSplitQ = SPLIT_Q;
#else
#error "DTYPE must be 1 (float16), 2 (bfloat16) or 3 (float32)"
#endif

constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = STAGES;
constexpr int kElemBytes = kIsF32 ? 4 : 2;
constexpr int kChunkElems = 16 / kElemBytes;           // elements per 16-byte cp.async chunk
constexpr int kRowChunks = kHeadDim / kChunkElems;     // chunks per shared-memory row
// One 16-byte pad per row: the 8 row addresses of an ldmatrix (and the 8 rows of a tf32 fragment)
// then fall in 8 different 16-byte bank groups, so tiles load without bank conflicts.
constexpr int kRowElems = kHeadDim + kChunkElems;
constexpr int kRowBytes = kRowElems * kElemBytes;
constexpr int kWarpRows = kBlockM / kWarps;
constexpr int kMTiles = kWarpRows / 16;                // m16 fragments per warp
constexpr int kNTiles = kBlockN / 8;                   // n8 fragments of S per warp row block
constexpr int kDTiles = kHeadDim / 8;                  // n8 fragments of O
constexpr int kKVTileBytes = kBlockN * kRowBytes;
// float32 (3xTF32): every operand is split into big = tf32(x) and small = tf32(x - big) once, into
// "planes" ordered by mma fragment: for each fragment, 32 lanes x 16 bytes in lane order, so a warp
// reads a whole fragment with one conflict-free 16-byte load per lane. A K_j or V_j fragment
// (m16n8k8 B operand) holds {big b[0], big b[1], small b[0], small b[1]} per lane (512 bytes); a
// Q_i fragment (A operand) is 512 bytes of big a[0..3] then 512 bytes of small a[0..3].
// Shared memory, float32: [Q_i: planes (SPLIT_Q) or as loaded][K_j planes][V_j planes][K_j][V_j]:
// one tile is split and computed from its planes while the next lands in the raw K_j/V_j buffer
// (kStages == 2). With SPLIT_Q, Q_i is first loaded into the space after its planes and split.
constexpr int kFragBytes = 32 * 16;
constexpr int kKVPlaneBytes = kBlockN * kHeadDim * 8;  // big and small of K_j (or V_j), 8 bytes an element
constexpr int kQLoadedBytes = kBlockM * kRowBytes;
constexpr int kQBytes = kSplitQ ? kBlockM * kHeadDim * 8 : kQLoadedBytes;
constexpr int kKVF32Bytes = 2 * kKVPlaneBytes + 2 * kKVTileBytes;
constexpr int kSmemBytes = !kIsF32 ? kQBytes + 2 * kStages * kKVTileBytes
                                   : kQBytes + (kSplitQ && kQLoadedBytes > kKVF32Bytes ? kQLoadedBytes : kKVF32Bytes);

static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16, "NUM_WARPS must be in 1..16");
static_assert(kBlockM % (16 * kWarps) == 0, "BLOCK_M must be a multiple of 16 * NUM_WARPS (m16 fragments per warp)");
static_assert(kMTiles >= 1 && kMTiles <= 4, "each warp owns 16, 32, 48 or 64 rows");
static_assert(kIsF32 || (kBlockN % 16 == 0 && kBlockN >= 16), "BLOCK_N must be a multiple of 16 (k16 steps of P V)");
static_assert(!kIsF32 || (kBlockN % 8 == 0 && kBlockN >= 8), "float32 BLOCK_N must be a multiple of 8 (k8 steps of P V)");
static_assert(kStages >= 2 && kStages <= 4, "STAGES must be in 2..4");
static_assert(!kIsF32 || kStages == 2, "float32 streams one raw K_j/V_j tile beside the split planes: STAGES must be 2");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert((kRowBytes / 4) % 32 == 4 || (kRowBytes / 4) % 32 == 20,
              "row stride must keep ldmatrix/tf32 fragment rows on distinct bank groups");

struct Tensor {
    const char* base;  // element (b, 0, h, 0) of this CTA's head
    i64 stride_s;      // elements between consecutive sequence positions
    i64 stride_d;      // elements between consecutive head-dim entries (1 on the VEC_LOAD path)
};

// Tile loads: thread tid copies chunk (tid % kRowChunks) of rows tid / kRowChunks + p * kRowsPerPass.
// The column is fixed per thread, so each pass only advances one pointer by a fixed row step.
constexpr int kRowsPerPass = kThreads / kRowChunks;
static_assert(kRowsPerPass >= 1, "a CTA needs at least one thread per 16-byte chunk of a row");

// Loads rows [row0, row0 + ROWS) x cols [0, HEAD_DIM) of a (seq, dim) view into padded shared
// memory; rows >= nrows and cols >= ncols become 0 (zeros keep tails out of every product).
// VEC_LOAD: 16-byte cp.async with zero-fill (needs 16-byte aligned rows, stride_d == 1).
// Otherwise: element loads with arbitrary strides, stored synchronously.
template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, int tid) {
    constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
    const int r = tid / kRowChunks;
    const int col0 = (tid % kRowChunks) * kChunkElems;
    if (r >= kRowsPerPass) return;
    int cols = ncols - col0;
    cols = cols < 0 ? 0 : (cols > kChunkElems ? kChunkElems : cols);
    const i64 step = kRowsPerPass * t.stride_s * kElemBytes;
#if VEC_LOAD
    const char* src = t.base + (static_cast<i64>(row0 + r) * t.stride_s + col0) * kElemBytes;
#else
    const char* src = t.base + (static_cast<i64>(row0 + r) * t.stride_s + col0 * t.stride_d) * kElemBytes;
#endif
    u32 dst = smem + r * kRowBytes + col0 * kElemBytes;
#if DTYPE == 3 && !VEC_LOAD
    // float32 element loads of many passes stay rolled: unrolled, the loads of every pass are issued
    // at once, and their values and 64-bit addresses do not fit beside O_i.
#pragma unroll(kPasses >= 8 ? 1 : kPasses)
#else
#pragma unroll
#endif
    for (int p = 0; p < kPasses; ++p) {
        if (kPasses * kRowsPerPass == ROWS || r + p * kRowsPerPass < ROWS) {
            const int valid = row0 + r + p * kRowsPerPass < nrows ? cols : 0;
#if VEC_LOAD
            cp_async_16(dst, valid > 0 ? src : t.base, valid * kElemBytes);
#else
            u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
            for (int e = 0; e < kChunkElems; ++e) {
                if (e < valid) {
#if DTYPE == 3
                    w[e] = *reinterpret_cast<const u32*>(src + e * t.stride_d * kElemBytes);
#else
                    const u32 h = *reinterpret_cast<const u16*>(src + e * t.stride_d * kElemBytes);
                    w[e / 2] |= h << (16 * (e % 2));
#endif
                }
            }
            sts_128(dst, w[0], w[1], w[2], w[3]);
#endif
        }
        src += step;
        // Keeps the compiler from precomputing every pass's address up front (registers held
        // across the whole main loop); one add per pass is cheaper than those registers.
        asm volatile("" : "+l"(src));
        dst += kRowsPerPass * kRowBytes;
    }
}

#if DTYPE != 3
// S_i += Q_i K_j^T for this warp's rows: ldmatrix fragments of Q_i (row-major A) and K_j (its rows
// are the columns of K_j^T, exactly the "col" B layout), one m16n8k16 per (m, n, k) step.
__device__ __forceinline__ void qk_product(float (&acc_s)[kMTiles][kNTiles][4], u32 sQ_warp, u32 sK, int lane) {
    // Lane l addresses row l%8 of matrix l/8; the four matrices of an x4 load tile 16x16.
    const u32 q_lane = sQ_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    const u32 k_lane = sK + ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        u32 a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], q_lane + mt * 16 * kRowBytes + kk * 32);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, k_lane + np * 16 * kRowBytes + kk * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma_m16n8k16<Elem>(acc_s[mt][2 * np], a[mt], b0);
                mma_m16n8k16<Elem>(acc_s[mt][2 * np + 1], a[mt], b1);
            }
        }
    }
}

// O_i += P V_j: P stays in registers (its C layout over two n8 tiles is one k16 A fragment);
// V_j is row-major [key][dim], so ldmatrix.trans yields the B fragments.
__device__ __forceinline__ void pv_product(float (&acc_o)[kMTiles][kDTiles][4], const float (&p)[kMTiles][kNTiles][4],
                                           u32 sV, int lane) {
    const u32 v_lane = sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
        u32 a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            a[mt][0] = pack2<Elem>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
            a[mt][1] = pack2<Elem>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
            a[mt][2] = pack2<Elem>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<Elem>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, v_lane + kk * 16 * kRowBytes + dp * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma_m16n8k16<Elem>(acc_o[mt][2 * dp], a[mt], b0);
                mma_m16n8k16<Elem>(acc_o[mt][2 * dp + 1], a[mt], b1);
            }
        }
    }
}
#else
// 3xTF32: each f32 operand x = big + small (both tf32); big*big' + big*small' + small*big' on
// tensor cores keeps the products at f32 accuracy (plain TF32 would lose ~3 decimal digits).
// The three products go into a fresh accumulator that is then added with an ordinary (rounded)
// f32 add: the tensor cores truncate when they accumulate, and chaining every k step into one
// accumulator would let that one-sided error grow with the length of the sum.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const u32 (&a_big)[4], const u32 (&a_small)[4],
                                           const u32 (&b_big)[2], const u32 (&b_small)[2]) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    mma_m16n8k8_tf32(part, a_big, b_big);
    mma_m16n8k8_tf32(part, a_small, b_big);
    mma_m16n8k8_tf32(part, a_big, b_small);
#pragma unroll
    for (int e = 0; e < 4; ++e) d[e] += part[e];
}

// Splits Q_i's m16n8k8 A fragment (mt, kk) of this warp from Q_i as loaded (rows padded to
// kRowBytes): a[0] = (g, t), a[1] = (g + 8, t), a[2] = (g, t + 4), a[3] = (g + 8, t + 4).
__device__ __forceinline__ void split_q_frag(u32 (&a_big)[4], u32 (&a_small)[4], u32 sQ_loaded_warp, int mt, int kk,
                                             int lane) {
    const u32 qa = sQ_loaded_warp + ((lane >> 2) + mt * 16) * kRowBytes + ((lane & 3) + kk * 8) * 4;
    split_tf32(lds_f32(qa), a_big[0], a_small[0]);
    split_tf32(lds_f32(qa + 8 * kRowBytes), a_big[1], a_small[1]);
    split_tf32(lds_f32(qa + 16), a_big[2], a_small[2]);
    split_tf32(lds_f32(qa + 8 * kRowBytes + 16), a_big[3], a_small[3]);
}

// SPLIT_Q: this warp's rows of Q_i into its planes, fragment (mt, kk) at (mt * kDTiles + kk) * 1024.
// Only this warp reads them.
__device__ __forceinline__ void split_q(u32 sQ_warp, u32 sQ_loaded_warp, int lane) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int kk = 0; kk < kDTiles; ++kk) {
            u32 a_big[4], a_small[4];
            split_q_frag(a_big, a_small, sQ_loaded_warp, mt, kk, lane);
            const u32 dst = sQ_warp + (mt * kDTiles + kk) * 2 * kFragBytes + lane * 16;
            sts_128(dst, a_big[0], a_big[1], a_big[2], a_big[3]);
            sts_128(dst + kFragBytes, a_small[0], a_small[1], a_small[2], a_small[3]);
        }
}

// Splits the raw K_j, V_j tile into their planes; the warps share the fragments. K_j fragment
// (nt, kk) is the B operand of S = Q K^T: b[0] = K[nt*8 + g][kk*8 + t], b[1] = column + 4. V_j
// fragment (nt, dt) is the B operand of O += P V under pv_product's key permutation:
// b[0] = V[nt*8 + 2t][dt*8 + g], b[1] = V[nt*8 + 2t + 1][dt*8 + g]. Both index as nt * kDTiles + kk
// (kk, dt < kDTiles), and the raw reads are conflict-free thanks to the row padding.
__device__ __forceinline__ void split_kv(u32 sKV, int warp, int lane) {
    constexpr int kFrags = kNTiles * kDTiles;
    const int g = lane >> 2, t = lane & 3;
    const u32 k_lane = sKV + 2 * kKVPlaneBytes + g * kRowBytes + t * 4;
    const u32 v_lane = sKV + 2 * kKVPlaneBytes + kKVTileBytes + 2 * t * kRowBytes + g * 4;
    // Rolled: unrolled, the compiler computes every fragment's addresses once for the whole loop
    // over tiles and holds them in registers throughout.
#pragma unroll 1
    for (int f = warp; f < kFrags; f += kWarps) {
        const int nt = f / kDTiles, kk = f - nt * kDTiles;
        const u32 src = nt * 8 * kRowBytes + kk * 32;
        const u32 dst = f * kFragBytes + lane * 16;
        u32 big[2], small[2];
        split_tf32(lds_f32(k_lane + src), big[0], small[0]);
        split_tf32(lds_f32(k_lane + src + 16), big[1], small[1]);
        sts_128(sKV + dst, big[0], big[1], small[0], small[1]);
        split_tf32(lds_f32(v_lane + src), big[0], small[0]);
        split_tf32(lds_f32(v_lane + src + kRowBytes), big[1], small[1]);
        sts_128(sKV + kKVPlaneBytes + dst, big[0], big[1], small[0], small[1]);
    }
}

// S_i += Q_i K_j^T from the K_j planes; Q_i fragments from its planes (SPLIT_Q) or split here.
// The loop over k8 steps stays rolled: unrolled, the compiler issues the fragment loads of many
// steps ahead and runs out of registers (spills at every register cap tried).
__device__ __forceinline__ void qk_product(float (&acc_s)[kMTiles][kNTiles][4], u32 sQ_warp, u32 sK, int lane) {
#pragma unroll 1
    for (int kk = 0; kk < kDTiles; ++kk) {
        u32 a_big[kMTiles][4], a_small[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if constexpr (kSplitQ) {
                const u32 qa = sQ_warp + (mt * kDTiles + kk) * 2 * kFragBytes + lane * 16;
                lds_128(qa, a_big[mt][0], a_big[mt][1], a_big[mt][2], a_big[mt][3]);
                lds_128(qa + kFragBytes, a_small[mt][0], a_small[mt][1], a_small[mt][2], a_small[mt][3]);
            } else {
                split_q_frag(a_big[mt], a_small[mt], sQ_warp, mt, kk, lane);
            }
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
            u32 b_big[2], b_small[2];
            lds_128(sK + (nt * kDTiles + kk) * kFragBytes + lane * 16, b_big[0], b_big[1], b_small[0], b_small[1]);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) mma_3xtf32(acc_s[mt][nt], a_big[mt], a_small[mt], b_big, b_small);
        }
    }
}

// O_i += P V_j from the V_j planes. The k8 step over keys uses the permutation k = t <-> key 2t,
// k = t + 4 <-> key 2t + 1, under which the C fragment of S is already the A fragment of P (no
// shuffles); the V_j planes hold the rows of the same keys. The loop over key blocks stays rolled
// (unrolled, the compiler issues the V_j loads of later blocks early and runs out of registers),
// so P of the current block is always p[.][0]: each step moves the next block's P to the front.
__device__ __forceinline__ void pv_product(float (&acc_o)[kMTiles][kDTiles][4], float (&p)[kMTiles][kNTiles][4],
                                           u32 sV, int lane) {
    u32 v_frag = sV + lane * 16;
#pragma unroll 1
    for (int nt = 0; nt < kNTiles; ++nt) {
        u32 a_big[kMTiles][4], a_small[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            split_tf32(p[mt][0][0], a_big[mt][0], a_small[mt][0]);
            split_tf32(p[mt][0][2], a_big[mt][1], a_small[mt][1]);
            split_tf32(p[mt][0][1], a_big[mt][2], a_small[mt][2]);
            split_tf32(p[mt][0][3], a_big[mt][3], a_small[mt][3]);
        }
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
            u32 b_big[2], b_small[2];
            lds_128(v_frag + dt * kFragBytes, b_big[0], b_big[1], b_small[0], b_small[1]);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) mma_3xtf32(acc_o[mt][dt], a_big[mt], a_small[mt], b_big, b_small);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int j = 0; j + 1 < kNTiles; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) p[mt][j][e] = p[mt][j + 1][e];
        v_frag += kDTiles * kFragBytes;
    }
}
#endif

// Online-softmax state of this thread's two rows (g and g + 8) in each m16 fragment, in the log2
// domain: m_i is the reference max of scale*log2(e)*S, l_i the running sum of exp2(s - m_i) over
// this thread's columns only (the quad's four partial sums are added once, in finalize).
//
// m_i moves only when some row of the warp finds a max more than kRescaleSlack above it: until then
// P = exp2(s - m_i) <= 2^kRescaleSlack, exact in f32 and as precise in f16/bf16 as any value, and
// O_i, l_i skip their rescale. Both are relative to the same m_i, so O_i / l_i and LSE stay exact.
constexpr float kRescaleSlack = 8.f;

struct SoftmaxState {
    float m[kMTiles][2];
    float l[kMTiles][2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m[mt][h] = neg_inf();
                l[mt][h] = 0.f;
            }
    }

    // Turns the scores into P = exp2(c * s - m_i) in place (c = scale * log2 e), first moving m_i
    // (and rescaling O_i and l_i) if the warp needs it. SCALED: s already holds c * S with masked
    // entries at -inf (tiles that need a mask); otherwise s is the raw S of an unmasked tile, the
    // row max is c * max S (c * min S for c < 0) and the scaling rides in the exp2's FFMA.
    // A row that has seen only masked keys keeps m = -inf and subtracts 0 instead, since
    // -inf - (-inf) would be NaN: its P and alpha are then exp2(-inf) = 0, so O_i and l_i stay 0.
    template <bool SCALED>
    __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&acc_o)[kMTiles][kDTiles][4],
                                           float c) {
        float mx[kMTiles][2];
        bool grow = false;
        const bool negate = !SCALED && c < 0.f;  // warp-uniform
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x;
                if (negate) {
                    x = __int_as_float(0x7f800000);
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = fminf(x, fminf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = -quad_max(-x);
                } else {
                    x = neg_inf();
#pragma unroll
                    for (int nt = 0; nt < kNTiles; ++nt) x = fmaxf(x, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
                    x = quad_max(x);
                }
                mx[mt][h] = SCALED ? x : c * x;
                grow |= mx[mt][h] > m[mt][h] + kRescaleSlack;
            }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float m_new = fmaxf(m[mt][h], mx[mt][h]);
                    const float alpha = exp2_approx(m[mt][h] - (m_new == neg_inf() ? 0.f : m_new));
                    m[mt][h] = m_new;
                    l[mt][h] *= alpha;
#pragma unroll
                    for (int dt = 0; dt < kDTiles; ++dt) {
                        acc_o[mt][dt][2 * h] *= alpha;
                        acc_o[mt][dt][2 * h + 1] *= alpha;
                    }
                }
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float m_use = m[mt][h] == neg_inf() ? 0.f : m[mt][h];
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        s[mt][nt][e] = exp2_approx(SCALED ? s[mt][nt][e] - m_use : fmaf(s[mt][nt][e], c, -m_use));
                        sum += s[mt][nt][e];
                    }
                l[mt][h] += sum;
            }
    }
};

// Loop-invariant inputs of tile_step.
struct TileLoop {
    u32 sQ_warp, sKV;  // this warp's Q_i rows (float32: planes or as loaded); K stages then V stages
                       // (float32: K_j planes, V_j planes, raw K_j, raw V_j)
    Tensor tk, tv;
    int n_blocks, seqlen_k, head_dim, head_dim_v, tid, lane;
    float scale_log2;
};

// One K_j/V_j tile: S = Q_i K_j^T, online softmax, O_i += P V_j. MASKED is a template parameter so
// the tiles strictly below the diagonal and before the Sk tail carry no masking code at all.
template <bool MASKED>
__device__ __forceinline__ void tile_step(const TileLoop& c, int it, int& stage, const int (&last_key)[kMTiles][2],
                                          SoftmaxState& state, float (&acc_o)[kMTiles][kDTiles][4]) {
#if DTYPE == 3
    cp_async_wait<0>();
    // Raw tile `it` (and Q_i without SPLIT_Q) has landed for every thread, and every warp is
    // done with the planes of tile it-1, which the split overwrites.
    __syncthreads();
    split_kv(c.sKV, c.tid >> 5, c.lane);
    // The planes of tile `it` are complete, and every warp has read the raw tile, which the
    // load below refills.
    __syncthreads();
    if (it + 1 < c.n_blocks) {
        const int n0 = (c.n_blocks - 2 - it) * kBlockN;
        load_tile<kBlockN>(c.sKV + 2 * kKVPlaneBytes, c.tk, n0, c.seqlen_k, c.head_dim, c.tid);
        load_tile<kBlockN>(c.sKV + 2 * kKVPlaneBytes + kKVTileBytes, c.tv, n0, c.seqlen_k, c.head_dim_v, c.tid);
    }
    cp_async_commit();
#else
    cp_async_wait<kStages - 2>();
    // Tile `it` (and Q_i) has landed for every thread, and every warp is done with tile it-1,
    // whose stage the load below refills.
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < c.n_blocks) {
        const int nstage = stage == 0 ? kStages - 1 : stage - 1;
        const int n0 = (c.n_blocks - 1 - nxt) * kBlockN;
        load_tile<kBlockN>(c.sKV + nstage * kKVTileBytes, c.tk, n0, c.seqlen_k, c.head_dim, c.tid);
        load_tile<kBlockN>(c.sKV + (kStages + nstage) * kKVTileBytes, c.tv, n0, c.seqlen_k, c.head_dim_v, c.tid);
    }
    cp_async_commit();
#endif

    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    qk_product(s, c.sQ_warp, kIsF32 ? c.sKV : c.sKV + stage * kKVTileBytes, c.lane);

    // Tiles with a mask: scale into the log2 domain and set keys past each row's last visible one
    // to -inf. Unmasked tiles leave the scaling to the softmax's exp2.
    if constexpr (MASKED) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] *= c.scale_log2;
        const int col0 = (c.n_blocks - 1 - it) * kBlockN + 2 * (c.lane & 3);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int bound = last_key[mt][hh] - col0;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (nt * 8 + e > bound) s[mt][nt][2 * hh + e] = neg_inf();
            }
    }

    state.update<MASKED>(s, acc_o, c.scale_log2);
    pv_product(acc_o, s, kIsF32 ? c.sKV + kKVPlaneBytes : c.sKV + (kStages + stage) * kKVTileBytes, c.lane);
    stage = stage + 1 == kStages ? 0 : stage + 1;
}

}  // namespace fwd
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::fwd;

// MAX_REGS > 0 caps registers per thread directly (for tiles whose compiler-chosen schedule would
// hoist more loads than fit, and spill); otherwise MIN_BLOCKS CTAs per SM set the cap.
#if MAX_REGS > 0
#define FLASH_FWD_BOUNDS __maxnreg__(MAX_REGS)
#else
#define FLASH_FWD_BOUNDS __launch_bounds__(kThreads, MIN_BLOCKS)
#endif

// Grid: blockIdx.x = (b * Hq + h) * num_m_blocks + (num_m_blocks - 1 - m_block), so B*Hq is not
// bound by gridDim.y/z limits, CTAs of one head run together (K/V stay in L2), and the longest
// causal tiles start first. Strides are in elements. vec_out: rows of out are 16-byte aligned with
// unit stride_d, so whole chunks are stored at once.
extern "C" __global__ void FLASH_FWD_BOUNDS
flash_fwd(const void* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v, void* __restrict__ out,
          float* __restrict__ lse, i64 q_sb, i64 q_ss, i64 q_sh, i64 q_sd, i64 k_sb, i64 k_ss, i64 k_sh, i64 k_sd,
          i64 v_sb, i64 v_ss, i64 v_sh, i64 v_sd, i64 o_sb, i64 o_ss, i64 o_sh, i64 o_sd, i64 lse_sb, i64 lse_sh,
          i64 lse_ss, int heads_q, int group, int seqlen_q, int seqlen_k, int head_dim, int head_dim_v, int causal,
          i64 causal_offset, float scale_log2, int num_m_blocks, int vec_out) {
    extern __shared__ __align__(128) char smem[];
    const u32 sQ = smem_addr(smem);
    const u32 sKV = sQ + kQBytes;  // K stages, then V stages (float32: planes, then raw tile)

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const i64 bh = blockIdx.x / num_m_blocks;
    const int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x - bh * num_m_blocks);
    const i64 b = bh / heads_q;
    const int h = static_cast<int>(bh - b * heads_q);
    const int h_kv = h / group;
    const int row0 = m_block * kBlockM;

    const Tensor tq{static_cast<const char*>(q) + (b * q_sb + h * q_sh) * kElemBytes, q_ss, q_sd};
    const Tensor tk{static_cast<const char*>(k) + (b * k_sb + h_kv * k_sh) * kElemBytes, k_ss, k_sd};
    const Tensor tv{static_cast<const char*>(v) + (b * v_sb + h_kv * v_sh) * kElemBytes, v_ss, v_sd};

    // Key tiles that any row of Q_i can see: all of them, or up to the last row's diagonal.
    i64 key_end = seqlen_k;
    if (causal) {
        const i64 diag_end = static_cast<i64>(row0) + kBlockM + causal_offset;  // last row sees keys < this
        key_end = diag_end < key_end ? diag_end : key_end;
    }
    const int n_blocks = key_end <= 0 ? 0 : static_cast<int>((key_end + kBlockN - 1) / kBlockN);

    // Tiles run from the last to the first, so the masked (diagonal, Sk tail) ones come first.
#if DTYPE == 3
    // With SPLIT_Q, Q_i lands where the K_j/V_j planes go and is split into its own planes.
    const u32 sQ_loaded = kSplitQ ? sKV : sQ;
    load_tile<kBlockM>(sQ_loaded, tq, row0, seqlen_q, head_dim, tid);
    if constexpr (kSplitQ) {
        cp_async_commit();
        cp_async_wait<0>();
        // Every thread's copies of Q_i have landed before warps split their rows.
        __syncthreads();
        split_q(sQ + warp * kWarpRows * kHeadDim * 8, sQ_loaded + warp * kWarpRows * kRowBytes, lane);
        // Every warp has read Q_i as loaded, which the first raw tile and the planes overwrite.
        __syncthreads();
    }
    if (n_blocks > 0) {
        const int n0 = (n_blocks - 1) * kBlockN;
        load_tile<kBlockN>(sKV + 2 * kKVPlaneBytes, tk, n0, seqlen_k, head_dim, tid);
        load_tile<kBlockN>(sKV + 2 * kKVPlaneBytes + kKVTileBytes, tv, n0, seqlen_k, head_dim_v, tid);
    }
    cp_async_commit();
#else
    load_tile<kBlockM>(sQ, tq, row0, seqlen_q, head_dim, tid);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_blocks) {
            const int n0 = (n_blocks - 1 - s) * kBlockN;
            load_tile<kBlockN>(sKV + s * kKVTileBytes, tk, n0, seqlen_k, head_dim, tid);
            load_tile<kBlockN>(sKV + (kStages + s) * kKVTileBytes, tv, n0, seqlen_k, head_dim_v, tid);
        }
        cp_async_commit();  // one group per stage, empty or not, so wait_group counts stay uniform
    }
#endif

    float acc_o[kMTiles][kDTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    SoftmaxState state;
    state.init();

    const u32 sQ_warp = sQ + warp * kWarpRows * kRowBytes;
    const int g = lane >> 2, t = lane & 3;
    int stage = 0;
    // Last key each of this thread's rows may see (-1: none); masking a tile element is then one
    // compare against a per-tile bound instead of index arithmetic per element.
    int last_key[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            i64 last = seqlen_k - 1;
            const i64 row = row0 + warp * kWarpRows + mt * 16 + g + hh * 8;
            if (causal && row + causal_offset < last) last = row + causal_offset;
            last_key[mt][hh] = static_cast<int>(last < -1 ? -1 : last);
        }

    const u32 sQ_frag = kSplitQ ? sQ + warp * kWarpRows * kHeadDim * 8 : sQ_warp;
    const TileLoop loop{sQ_frag, sKV, tk, tv, n_blocks, seqlen_k, head_dim, head_dim_v, tid, lane, scale_log2};
    // Tiles that cross the Sk tail or the diagonal come first (descending order); from the first
    // tile that needs no mask on, none does.
    int it = 0;
    for (; it < n_blocks; ++it) {
        const i64 n0 = static_cast<i64>(n_blocks - 1 - it) * kBlockN;
        const bool tail = n0 + kBlockN > seqlen_k;
        const bool diag = causal && n0 + kBlockN - 1 > row0 + causal_offset;
        if (!tail && !diag) break;
        tile_step<true>(loop, it, stage, last_key, state, acc_o);
    }
    for (; it < n_blocks; ++it) tile_step<false>(loop, it, stage, last_key, state, acc_o);
    cp_async_wait<0>();
    // Every thread's copies into Q_i have landed (the loop's barriers do not cover n_blocks == 0)
    // before warps reuse their Q_i rows to stage O_i; with SPLIT_Q those rows overlap other warps'
    // Q_i planes, which every warp is done with here.
    __syncthreads();

    // Finalize: O_i = acc / l_i, LSE_i = ln 2 * (m_i + log2 l_i); a row with l_i = 0 saw no key.
    float inv_l[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float l = quad_sum(state.l[mt][hh]);
            inv_l[mt][hh] = l > 0.f ? 1.f / l : 0.f;
            const int row = row0 + warp * kWarpRows + mt * 16 + g + hh * 8;
            if (t == 0 && row < seqlen_q) {
                const float val = l > 0.f ? 0.6931471805599453f * (state.m[mt][hh] + log2_approx(l)) : neg_inf();
                lse[b * lse_sb + h * lse_sh + row * lse_ss] = val;
            }
        }

    // Stage O_i through this warp's own rows of the Q_i buffer (only this warp read them, or with
    // SPLIT_Q no warp reads the buffer any more), then write whole 16-byte chunks per lane so global
    // stores are coalesced.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float x0 = acc_o[mt][dt][2 * hh] * inv_l[mt][hh];
                const float x1 = acc_o[mt][dt][2 * hh + 1] * inv_l[mt][hh];
                const u32 addr = sQ_warp + (mt * 16 + g + hh * 8) * kRowBytes + (dt * 8 + 2 * t) * kElemBytes;
#if DTYPE == 3
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x0), "f"(x1) : "memory");
#else
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack2<Elem>(x0, x1)) : "memory");
#endif
            }
    __syncwarp();  // this warp's staged rows are complete before its lanes read across them

    char* const o_base = static_cast<char*>(out) + (b * o_sb + h * o_sh) * kElemBytes;
    constexpr int kOutIters = (kWarpRows * kRowChunks + 31) / 32;
#pragma unroll
    for (int it = 0; it < kOutIters; ++it) {
        const int c = lane + it * 32;
        const int r = c / kRowChunks;
        const int col0 = (c % kRowChunks) * kChunkElems;
        const int row = row0 + warp * kWarpRows + r;
        if (r >= kWarpRows || row >= seqlen_q || col0 >= head_dim_v) continue;
        u32 w[4];
        lds_128(sQ_warp + r * kRowBytes + col0 * kElemBytes, w[0], w[1], w[2], w[3]);
        char* const p = o_base + static_cast<i64>(row) * o_ss * kElemBytes;
        if (vec_out && col0 + kChunkElems <= head_dim_v) {
            *reinterpret_cast<uint4*>(p + col0 * kElemBytes) = make_uint4(w[0], w[1], w[2], w[3]);
        } else {
#pragma unroll
            for (int e = 0; e < kChunkElems; ++e) {
                if (col0 + e < head_dim_v) {
                    char* const pe = p + static_cast<i64>(col0 + e) * o_sd * kElemBytes;
#if DTYPE == 3
                    *reinterpret_cast<u32*>(pe) = w[e];
#else
                    *reinterpret_cast<u16*>(pe) = static_cast<u16>(w[e / 2] >> (16 * (e % 2)));
#endif
                }
            }
        }
    }
}
