// Tile I/O shared by every kernel: the view of one head of a BSHD tensor, tile loads into shared
// memory, loads of per-row float vectors, the float32 reductions of dQ into its workspace and the
// stores of accumulator tiles.
#pragma once

#include "params.cuh"

namespace cuflash {

// One (batch, head) of a BSHD tensor as a (seq, dim) view, from sequence position row0 (a packed
// sequence's first row, attn/seqlen.cuh).
struct Tensor {
    const char* base;  // element (b, row0, h, 0)
    i64 stride_s;      // elements between consecutive sequence positions
    i64 stride_d;      // elements between consecutive head-dim entries (1 on the vector path)

    __device__ __forceinline__ static Tensor of(const void* data, const Strides& st, i64 b, i64 h, int elem_bytes,
                                                i64 row0 = 0) {
        return Tensor{static_cast<const char*>(data) + (b * st.b + h * st.h + row0 * st.s) * elem_bytes, st.s, st.d};
    }
};

// Shared-memory tile layouts for load_tile: Layout::offset(r, chunk) is the byte offset of the
// 16-byte chunk `chunk` of row r. PaddedRows: rows RowBytes apart (one 16-byte pad per row keeps
// the 8 rows of an ldmatrix on distinct bank groups); wg::Swizzle128 (wgmma.cuh) for wgmma operands.
template <int RowBytes>
struct PaddedRows {
    __device__ __forceinline__ static u32 offset(int r, int chunk) { return static_cast<u32>(r * RowBytes + chunk * 16); }
};

// Loads rows [row0, row0 + Rows) x cols [0, Dim) of a (seq, dim) view with ElemBytes-byte
// elements into a shared-memory tile laid out by Layout; rows outside [row_lo, nrows) and cols >=
// ncols become 0, which keeps tails (and the backward's fully masked rows) out of every product. Threads threads share the copy: thread tid copies the
// 16-byte chunk tid % RowChunks of rows tid / RowChunks + p * RowsPerPass, so its column is fixed
// and each pass only advances one pointer by a fixed row step (threads past RowsPerPass * RowChunks
// idle when a row's chunks do not divide the CTA).
// Vec: 16-byte cp.async with zero-fill (rows 16-byte aligned, stride_d == 1); otherwise element
// loads with arbitrary strides, stored synchronously (the fallback for strided views), unrolled
// ElemUnroll passes at a time: unrolled further, their loads and 64-bit addresses are all live at
// once and cost registers the accumulators need.
template <int Rows, int Dim, int ElemBytes, int Threads, typename Layout, bool Vec, int ElemUnroll = 1>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, int tid,
                                          int row_lo = 0) {
    constexpr int kChunkElems = 16 / ElemBytes;
    constexpr int kRowChunks = Dim / kChunkElems;
    constexpr int kRowsPerPass = Threads / kRowChunks;
    constexpr int kPasses = (Rows + kRowsPerPass - 1) / kRowsPerPass;
    static_assert(kRowsPerPass >= 1, "a CTA needs at least one thread per 16-byte chunk of a row");
    const int r = tid / kRowChunks, chunk = tid % kRowChunks;
    const int col0 = chunk * kChunkElems;
    if (r >= kRowsPerPass) return;
    int cols = ncols - col0;
    cols = cols < 0 ? 0 : (cols > kChunkElems ? kChunkElems : cols);
    const i64 step = kRowsPerPass * t.stride_s * ElemBytes;
    const char* src = t.base + (static_cast<i64>(row0 + r) * t.stride_s + (Vec ? col0 : col0 * t.stride_d)) * ElemBytes;
#pragma unroll(Vec ? kPasses : ElemUnroll)
    for (int p = 0; p < kPasses; ++p) {
        const int rr = r + p * kRowsPerPass;
        if (kPasses * kRowsPerPass == Rows || rr < Rows) {
            const u32 dst = smem + Layout::offset(rr, chunk);
            // One unsigned compare tests row_lo <= row < nrows.
            const int valid = static_cast<unsigned>(row0 + rr - row_lo) < static_cast<unsigned>(nrows - row_lo) ? cols : 0;
            if constexpr (Vec) {
                cp_async_16(dst, valid > 0 ? src : t.base, valid * ElemBytes);
            } else {
                u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
                for (int e = 0; e < kChunkElems; ++e) {
                    if (e < valid) {
                        if constexpr (ElemBytes == 8) {
                            const unsigned long long x =
                                *reinterpret_cast<const unsigned long long*>(src + e * t.stride_d * ElemBytes);
                            w[2 * e] = static_cast<u32>(x);
                            w[2 * e + 1] = static_cast<u32>(x >> 32);
                        } else if constexpr (ElemBytes == 4) {
                            w[e] = *reinterpret_cast<const u32*>(src + e * t.stride_d * ElemBytes);
                        } else {
                            const u32 h = *reinterpret_cast<const u16*>(src + e * t.stride_d * ElemBytes);
                            w[e / 2] |= h << (16 * (e % 2));
                        }
                    }
                }
                sts_128(dst, w[0], w[1], w[2], w[3]);
            }
        }
        src += step;
        // Keeps the compiler from precomputing every pass's address up front (registers held
        // across the whole main loop); one add per pass is cheaper than those registers.
        asm volatile("" : "+l"(src));
    }
}

// The same with the path chosen at run time (kernels whose layouts are checked per call).
template <int Rows, int Dim, int ElemBytes, int Threads, typename Layout>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid,
                                          int row_lo = 0) {
    if (vec) load_tile<Rows, Dim, ElemBytes, Threads, Layout, true>(smem, t, row0, nrows, ncols, tid, row_lo);
    else load_tile<Rows, Dim, ElemBytes, Threads, Layout, false>(smem, t, row0, nrows, ncols, tid, row_lo);
}

// L2 and D of one query tile of Rows rows (float, or double in the float64 kernels): both buffers are
// padded to a multiple of 128 rows, so the copy needs no bounds.
// ALIGNED16 = false: src need only be aligned to its element (a packed batch's per-sequence rows
// start anywhere), and each element is its own copy.
template <int Rows, int Threads, bool Aligned16 = true, typename T>
__device__ __forceinline__ void load_vec(u32 smem, const T* src, int tid) {
    if constexpr (Aligned16) {
        constexpr int kPerChunk = 16 / sizeof(T);
        for (int c = tid; c < Rows / kPerChunk; c += Threads) cp_async_16(smem + c * 16, src + c * kPerChunk, 16);
    } else {
        for (int c = tid; c < Rows; c += Threads) cp_async_small<sizeof(T)>(smem + c * sizeof(T), src + c);
    }
}

// Adds one 16x16 block of dQ (accumulator layout: two n8 tiles c0, c1) into the float32 workspace,
// whose rows are RowElems apart. On sm_90 two quad neighbours swap pairs so each lane adds 4
// consecutive columns with one vector reduction, 4x fewer atomic operations than scalar adds (not
// in the sm75 family's variants, which keep Turing's scalar adds wherever they run).
template <int RowElems>
__device__ __forceinline__ void add_dq_block(float* rows, const float (&c0)[4], const float (&c1)[4], int lane) {
    const int g = lane >> 2, t = lane & 3;
#if __CUDA_ARCH__ >= 900 && !TURING
    const bool even = (t & 1) == 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float(&c)[4] = half ? c1 : c0;
        // Even t keeps row g and takes its neighbour's row-g pair; odd t keeps row g + 8.
        const float send0 = even ? c[2] : c[0];
        const float send1 = even ? c[3] : c[1];
        const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
        const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
        const float x0 = even ? c[0] : got0, x1 = even ? c[1] : got1;
        const float x2 = even ? got0 : c[2], x3 = even ? got1 : c[3];
        float* const p = rows + static_cast<i64>(even ? g : g + 8) * RowElems + half * 8 + 2 * (t & 2);
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x0), "f"(x1), "f"(x2), "f"(x3)
                     : "memory");
    }
#else
#pragma unroll
    for (int e = 0; e < 8; ++e)
        atomicAdd(rows + static_cast<i64>(g + ((e >> 1) & 1) * 8) * RowElems + (e >> 2) * 8 + 2 * t + (e & 1),
                  (e >> 2) ? c1[e & 3] : c0[e & 3]);
#endif
}

// Elements stored in their accumulator type (float, double) rather than as 16-bit values.
template <typename Elem> constexpr bool kIsFloat = false;
template <> constexpr bool kIsFloat<float> = true;
template <> constexpr bool kIsFloat<double> = true;

// Writes mul * acc (a warp tile in the mma accumulator layout: MT m16 rows from row0 by NT n8
// columns from col0; A is float, or double for float64) to a (seq, dim) view, in Elem (Half,
// BFloat16, float or double) or, for GQA partial sums, in A; rows >= nrows and cols >= ncols are
// skipped.
template <typename Elem, int MT, int NT, typename A>
__device__ __forceinline__ void store_acc(const A (&acc)[MT][NT][4], A mul, char* base, i64 stride_s,
                                          i64 stride_d, int row0, int nrows, int col0, int ncols, bool f32_out,
                                          int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + mt * 16 + g + (e >> 1) * 8;
                const int col = col0 + nt * 8 + 2 * t + (e & 1);
                if (row >= nrows || col >= ncols) continue;
                const A val = acc[mt][nt][e] * mul;
                const i64 off = static_cast<i64>(row) * stride_s + static_cast<i64>(col) * stride_d;
                if constexpr (kIsFloat<Elem>) {
                    reinterpret_cast<A*>(base)[off] = val;
                } else {
                    if (f32_out) reinterpret_cast<float*>(base)[off] = val;
                    else reinterpret_cast<u16*>(base)[off] = from_float<Elem>(val);
                }
            }
}

// The same for a warp tile of one m16 row block.
template <typename Elem, int NT, typename A>
__device__ __forceinline__ void store_acc(const A (&acc)[NT][4], A mul, char* base, i64 stride_s,
                                          i64 stride_d, int row0, int nrows, int col0, int ncols, bool f32_out,
                                          int lane) {
    store_acc<Elem>(reinterpret_cast<const A(&)[1][NT][4]>(acc), mul, base, stride_s, stride_d, row0, nrows, col0,
                    ncols, f32_out, lane);
}

__device__ __forceinline__ float2 lds_f32x2(u32 addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

}  // namespace cuflash
