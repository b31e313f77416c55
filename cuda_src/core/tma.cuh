// Hopper (sm_90a) asynchronous copies and the barriers that track them: mbarrier, bulk tensor copies
// (TMA) through tensor maps, register reallocation between warpgroups, named barriers.
//
// A tensor map (params.cuh's TensorMap) is built on the host by the driver's cuTensorMapEncodeTiled
// (cuflash/_cuda/tensor_map.py) and handed over inside a __grid_constant__ parameter struct; its
// address in the parameter space is what cp.async.bulk.tensor takes. One copy moves one box of the
// tensor into shared memory, zero-filling elements outside the tensor's bounds, and counts the box's
// bytes (zero-filled ones included) against the mbarrier's expected transaction count.
//
// mbarrier phases (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier"): a
// barrier completes its current phase when the expected arrivals have arrived and the expected
// transaction bytes have landed; waits name the parity of the phase they wait for. A freshly
// initialised barrier counts as having completed the phase of parity 1, so a producer's first wait
// on an "empty" barrier with parity 1 returns at once.
#pragma once

#include "ptx.cuh"

namespace cuflash {
namespace tma {

using u64 = unsigned long long;

__device__ __forceinline__ void mbar_init(u32 bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Makes the initialisations visible to the async proxy (the TMA unit's complete_tx) and to the
// other threads; a __syncthreads must follow before any thread uses the barriers.
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival that also raises the phase's expected transaction count by `bytes`.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits (acquire) until the phase of the given parity has completed: the writes it tracked, TMA
// copies included, are then visible to this thread.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}

// Generic address of a tensor map in the kernel's parameter space.
__device__ __forceinline__ u64 map_addr(const void* map) { return reinterpret_cast<u64>(map); }

__device__ __forceinline__ void prefetch_map(const void* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(map_addr(map)) : "memory");
}

// One box of a rank-4 tensor map at coordinates (c0 innermost .. c3) into shared memory at dst,
// completing on mbarrier bar.
__device__ __forceinline__ void load_4d(u32 dst, const void* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(map_addr(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Register reallocation: every thread of the warpgroup executes it. A producer warpgroup gives
// registers back to the CTA's pool, the consumer warpgroups take them (N a multiple of 8 in 24..256).
template <int N> __device__ __forceinline__ void release_registers() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void claim_registers() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads, whole warps.
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace tma
}  // namespace cuflash
