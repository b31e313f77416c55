// FP64 tensor-core products for the float64 kernels: mma.sync.aligned.m8n8k4.row.col.f64 ("DMMA",
// sm_80 and newer) on tiles of doubles in shared memory whose rows are R bytes apart, R = 8 * HEAD_DIM
// + 16 (HEAD_DIM a multiple of 32, so R = 16 mod 256; one 16-byte pad per row, as core/tile_io.cuh's
// PaddedRows lays them out).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m8n8k4 with .f64 floating point type"), with
// g = lane / 4 and t = lane % 4: A (8x4, row-major) a = A[g][t]; B (4x8, "col") b = B[t][g];
// C/D (8x8) c[i] = C[g][2t + i], i = 0, 1.
//
// Warp tiles are kept as m16 x n8 blocks of four doubles: c[0], c[1] = (row g, cols 2t, 2t + 1) and
// c[2], c[3] = (row g + 8, same cols), two DMMA accumulators stacked. That is the C layout of the
// 16-bit and float32 kernels' mma.m16n8, so the shared softmax (attn/softmax.cuh), masking and
// core/tile_io.cuh's store_acc read float64 tiles with the same indices.
//
// Which 4 of the summed indices one k4 step takes is free, as long as A and B agree. Two orders
// keep every shared-memory read conflict-free:
//   "rows by rows" (both operands row-major along k: S = Q K^T, dP = dO V^T): in each block of 16
//     columns, lane t loads columns 4t .. 4t + 3 with two 16-byte loads, and step s = 0..3 of the
//     block pairs k = t with column 4t + s. The 8 lanes of a 16-byte load phase (rows g = 0, 1)
//     read chunks at 32t and R + 32t: eight distinct 16-byte bank groups.
//   "tile" (an operand row-major along k, [k][n]: V in O += P V, dO, Q, K in dV, dK, dQ): step e = 0, 1
//     of each 8 rows pairs k = t with row 2t + e, the order in which an accumulator block's own
//     columns (2t, 2t + 1) are an A operand, so P and dS feed the next product from registers with no
//     shuffles. A 64-bit load phase (16 lanes) reads rows 0, 2, 4, 6 (2R = 32 mod 128 apart) x 32
//     bytes: conflict-free; rows R' = 16 mod 64 apart (the dS^T staging of the atomic dQ) likewise.
#pragma once

#include "ptx.cuh"

namespace cuflash {

// d += a * b for one 8x8x4 block; d0, d1 are this lane's two accumulator elements.
__device__ __forceinline__ void dmma_884(double& d0, double& d1, double a, double b) {
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
                 : "+d"(d0), "+d"(d1)
                 : "d"(a), "d"(b));
}

// One m16 x n8 block += A (rows g: a_lo, rows g + 8: a_hi) x b for one k4 step.
__device__ __forceinline__ void dmma_m16(double (&c)[4], double a_lo, double a_hi, double b) {
    dmma_884(c[0], c[1], a_lo, b);
    dmma_884(c[2], c[3], a_hi, b);
}

__device__ __forceinline__ double lds_f64(u32 addr) {
    double v;
    asm volatile("ld.shared.f64 %0, [%1];\n" : "=d"(v) : "r"(addr));
    return v;
}

__device__ __forceinline__ void lds_f64x2(u32 addr, double& a, double& b) {
    asm volatile("ld.shared.v2.f64 {%0, %1}, [%2];\n" : "=d"(a), "=d"(b) : "r"(addr));
}

__device__ __forceinline__ void sts_f64x2(u32 addr, double a, double b) {
    asm volatile("st.shared.v2.f64 [%0], {%1, %2};\n" ::"r"(addr), "d"(a), "d"(b) : "memory");
}

// acc[mt][nt] += A_mt B_nt^T over Cols columns ("rows by rows"): A has MT blocks of 16 rows from sA,
// B NT blocks of 8 rows from sB, both with rows RowBytes apart. Unroll: 16-column blocks unrolled
// (the loads of unrolled blocks are issued together and hold registers).
template <int MT, int NT, int Cols, int RowBytes, int Unroll>
__device__ __forceinline__ void dmma_rows_by_rows(double (&acc)[MT][NT][4], u32 sA, u32 sB, int lane) {
    static_assert(Cols % 16 == 0, "rows by rows contracts 16-column blocks");
    const int g = lane >> 2, t = lane & 3;
    const u32 a_lane = sA + g * RowBytes + t * 32;
    const u32 b_lane = sB + g * RowBytes + t * 32;
#pragma unroll Unroll
    for (int kb = 0; kb < Cols / 16; ++kb) {
        double a[MT][2][4], b[NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 addr = a_lane + (mt * 16 + h * 8) * RowBytes + kb * 128;
                lds_f64x2(addr, a[mt][h][0], a[mt][h][1]);
                lds_f64x2(addr + 16, a[mt][h][2], a[mt][h][3]);
            }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const u32 addr = b_lane + nt * 8 * RowBytes + kb * 128;
            lds_f64x2(addr, b[nt][0], b[nt][1]);
            lds_f64x2(addr + 16, b[nt][2], b[nt][3]);
        }
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) dmma_m16(acc[mt][nt], a[mt][0][s], a[mt][1][s], b[nt][s]);
    }
}

// acc[mt][nt] += X_mt B[:, nt] ("tile"): X is MT x KT blocks (16 rows x 8 columns each) in registers
// in the accumulator layout, B row-major [k][n] from sB (its first row and column), KT * 8 rows of
// B contracted, NT n8 column blocks produced.
template <int MT, int KT, int NT, int RowBytes>
__device__ __forceinline__ void dmma_regs_by_tile(double (&acc)[MT][NT][4], const double (&x)[MT][KT][4], u32 sB,
                                                  int lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32 b_lane = sB + 2 * t * RowBytes + g * 8;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const double b = lds_f64(b_lane + (kt * 8 + e) * RowBytes + nt * 64);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) dmma_m16(acc[mt][nt], x[mt][kt][e], x[mt][kt][2 + e], b);
            }
}

// acc[nt] += A^T B over K rows ("tile" on both): A row-major [k][m] from sA (its column m0; the 16
// columns m0.. are the product's rows), B row-major [k][n] from sB (its first of NT n8 column blocks).
template <int NT, int K, int RowBytesA, int RowBytesB>
__device__ __forceinline__ void dmma_cols_by_tile(double (&acc)[NT][4], u32 sA, u32 sB, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32 a_lane = sA + 2 * t * RowBytesA + g * 8;
    const u32 b_lane = sB + 2 * t * RowBytesB + g * 8;
#pragma unroll
    for (int kt = 0; kt < K / 8; ++kt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const u32 a_row = a_lane + (kt * 8 + e) * RowBytesA;
            const double a_lo = lds_f64(a_row), a_hi = lds_f64(a_row + 64);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                dmma_m16(acc[nt], a_lo, a_hi, lds_f64(b_lane + (kt * 8 + e) * RowBytesB + nt * 64));
        }
}

}  // namespace cuflash
