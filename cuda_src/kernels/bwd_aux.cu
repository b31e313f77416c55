// The small memory-bound kernels around the backward's main kernels:
//   flash_bwd_preprocess  D_i = rowsum(dO_i o O_i) and L2_i = LSE_i * log2 e per query row, in the
//                         accumulator type (float32; float64 for float64), (B, Hq, Sq_pad) contiguous; rows i >= Sq (padding) get D = 0, L2 = +inf,
//                         and so do rows with LSE = -inf (no visible key): exp2(s - L2) is then 0,
//                         never NaN, so such rows pass on no gradient. Ragged batches: every row of
//                         the workspace as attn/seqlen.cuh lays it out (ws_row0), i >= Sq_b padding.
//   flash_bwd_convert     out = scale * sum over `splits` accumulator-type partials, in the output dtype and
//                         layout: the dQ workspace of the atomic path (padded rows and columns are
//                         skipped, rows that see no key written as 0), and the GQA partial sums of
//                         dK/dV (added in split order, so the result is deterministic).
// Both serve dense and ragged problems in one instantiation (the ragged index arithmetic is a
// null-pointer test per row in these memory-bound kernels).
// DTYPE (core/elem.cuh) is the dtype of out, dO and the converted output.
#include "../attn/seqlen.cuh"
#include "../core/elem.cuh"
#include "../core/params.cuh"

namespace cuflash {
namespace bwd_aux {

constexpr Accum kLog2e = static_cast<Accum>(1.4426950408889634);
using M = Num<Accum>;

}  // namespace bwd_aux
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::bwd_aux;

// One warp per row of the workspaces, blockDim.x = 256: query row (b, h, i) of the padded range
// B * Hq * Sq_pad, or packed, row r of head h's seqlen_q_pad rows, in sequence b at i = r -
// (cu_seqlens_q[b] + kWsRowPad * b) (attn/seqlen.cuh's ws_row0, inverted).
extern "C" __global__ void __launch_bounds__(256) flash_bwd_preprocess(const __grid_constant__ BwdParamsOf<Accum> p) {
    const FwdParamsOf<Accum>& f = p.fwd;
    const int lane = threadIdx.x & 31;
    const i64 row = static_cast<i64>(blockIdx.x) * 8 + (threadIdx.x >> 5);
    const bool packed = f.cu_seqlens_q != nullptr;
    if (row >= static_cast<i64>(packed ? 1 : f.batch) * f.heads_q * p.seqlen_q_pad) return;
    const i64 bh = row / p.seqlen_q_pad;
    const i64 r = row - bh * p.seqlen_q_pad;
    i64 b;
    int h, i;
    if (packed) {
        h = static_cast<int>(bh);
        b = packed_seq_of(f.cu_seqlens_q, f.batch, r, kWsRowPad);
        i = static_cast<int>(r - (f.cu_seqlens_q[b] + kWsRowPad * b));
    } else {
        b = bh / f.heads_q;
        h = static_cast<int>(bh - b * f.heads_q);
        i = static_cast<int>(r);
    }
    const Seq seq = Seq::of<true>(f, b);
    Accum sum = Accum(0), l2_row = M::inf();
    if (i < seq.seqlen_q) {
        const i64 iq = static_cast<i64>(seq.q0) + i;
        const char* o = static_cast<const char*>(f.out) + (b * f.o_st.b + h * f.o_st.h + iq * f.o_st.s) * kElemBytes;
        const char* d = static_cast<const char*>(p.dout) + (b * p.do_st.b + h * p.do_st.h + iq * p.do_st.s) * kElemBytes;
        for (int c = lane; c < f.head_dim_v; c += 32)
            sum += load_elem(o + c * f.o_st.d * kElemBytes) * load_elem(d + c * p.do_st.d * kElemBytes);
        const Accum lse_row = f.lse[b * f.lse_sb + h * f.lse_sh + iq * f.lse_ss];
        if (lse_row != M::neg_inf()) l2_row = lse_row * kLog2e;
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
    if (lane == 0) {
        p.l2[row] = l2_row;
        // A row that sees no key gets D = 0 whatever its dO holds: a NaN there must not reach dS.
        p.dsum[row] = i < seq.seqlen_q && l2_row != M::inf() ? sum : Accum(0);
    }
}

// One warp per row (b, h, s) of the workspace, lanes along c, so the float32 reads coalesce and
// the index arithmetic is paid once per row: dst[b, s, h, c] = scale * sum_split
// src[split * split_stride + (b * H + h) * src_sh + s * src_ss + c] for c < dim.
// With l2 (the dQ workspace's rows, l2[(b * H + h) * l2_sh + s]), rows whose L2 is +inf (they see
// no key) are written as 0: their dS is 0, but 0 times a NaN in K would not be.
// With cu_seqlens (packed queries: dst (1, total_q, H, dim)), row s of dst is row s + kWsRowPad * b
// of the workspaces, b the sequence holding it (attn/seqlen.cuh's ws_row0).
// At least 4 CTAs per SM: 64 registers. Without a bound ptxas aims at full occupancy (32 registers)
// and spills the float64 variant.
extern "C" __global__ void __launch_bounds__(256, 4)
flash_bwd_convert(const Accum* __restrict__ src, i64 split_stride, i64 src_sh, i64 src_ss, int splits,
                  void* __restrict__ dst, i64 d_sb, i64 d_ss, i64 d_sh, i64 d_sd, int heads, int seqlen, int dim,
                  Accum scale, i64 rows, const Accum* __restrict__ l2, i64 l2_sh, const int* __restrict__ cu_seqlens,
                  int batch) {
    const int lane = threadIdx.x & 31;
    const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
    for (i64 row = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
         row += warps) {
        const int s = static_cast<int>(row % seqlen);
        const i64 bh = row / seqlen;
        const int h = static_cast<int>(bh % heads);
        const i64 b = bh / heads;
        const i64 s_ws = cu_seqlens != nullptr ? s + static_cast<i64>(kWsRowPad) * packed_seq_of(cu_seqlens, batch, s, 0)
                                               : static_cast<i64>(s);
        const Accum* p = src + bh * src_sh + s_ws * src_ss;
        char* const q =
            static_cast<char*>(dst) + (b * d_sb + static_cast<i64>(s) * d_ss + static_cast<i64>(h) * d_sh) * kElemBytes;
        const bool no_key = l2 != nullptr && l2[bh * l2_sh + s_ws] == M::inf();
        for (int c = lane; c < dim; c += 32) {
            Accum acc = Accum(0);
            for (int sp = 0; sp < splits; ++sp) acc += p[sp * split_stride + c];
            store_elem(q + static_cast<i64>(c) * d_sd * kElemBytes, no_key ? Accum(0) : scale * acc);
        }
    }
}
