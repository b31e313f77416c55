// Element traits: the one place where the DTYPE define of a kernel variant becomes a type.
//
//   DTYPE 1 float16, 2 bfloat16 (16-bit tensor-core path, mma.m16n8k16)
//         3 float32 (3xTF32 tensor-core path, mma.m16n8k8)
//
// Elem is the tag the PTX wrappers of ptx.cuh are templated on (Half, BFloat16, or float);
// load_elem/store_elem move one element between memory and an f32 register.
#pragma once

#include "ptx.cuh"

#if !defined(DTYPE)
#error "kernels need DTYPE defined (1 float16, 2 bfloat16, 3 float32)"
#endif

namespace cuflash {

#if DTYPE == 1
using Elem = Half;
#elif DTYPE == 2
using Elem = BFloat16;
#elif DTYPE == 3
using Elem = float;
#else
#error "DTYPE must be 1 (float16), 2 (bfloat16) or 3 (float32)"
#endif

constexpr bool kIsF32 = DTYPE == 3;
constexpr int kElemBytes = kIsF32 ? 4 : 2;

#if DTYPE == 3
__device__ __forceinline__ float load_elem(const char* p) { return *reinterpret_cast<const float*>(p); }
__device__ __forceinline__ void store_elem(char* p, float x) { *reinterpret_cast<float*>(p) = x; }
#else
__device__ __forceinline__ float load_elem(const char* p) { return to_float<Elem>(*reinterpret_cast<const u16*>(p)); }
__device__ __forceinline__ void store_elem(char* p, float x) { *reinterpret_cast<u16*>(p) = from_float<Elem>(x); }
#endif

}  // namespace cuflash
