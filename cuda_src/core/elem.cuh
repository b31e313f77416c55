// Element traits: the one place where the DTYPE define of a kernel variant becomes a type.
//
//   DTYPE 1 float16, 2 bfloat16 (16-bit tensor-core path, mma.m16n8k16)
//         3 float32 (3xTF32 tensor-core path, mma.m16n8k8)
//         4 float64 (FP64 tensor cores, mma.m8n8k4 f64: core/dmma.cuh)
//
// Elem is the tag the PTX wrappers of ptx.cuh are templated on (Half, BFloat16, float or double);
// Accum the accumulator type (float, double for float64), which is also the type of the LSE, of
// the score constants and of the backward's workspaces (core/params.cuh's FwdParamsOf<Accum>);
// load_elem/store_elem move one element between memory and an Accum register.
#pragma once

#include "accum.cuh"

#if !defined(DTYPE)
#error "kernels need DTYPE defined (1 float16, 2 bfloat16, 3 float32, 4 float64)"
#endif

namespace cuflash {

#if DTYPE == 1
using Elem = Half;
#elif DTYPE == 2
using Elem = BFloat16;
#elif DTYPE == 3
using Elem = float;
#elif DTYPE == 4
using Elem = double;
#else
#error "DTYPE must be 1 (float16), 2 (bfloat16), 3 (float32) or 4 (float64)"
#endif

constexpr bool kIsF32 = DTYPE == 3;
constexpr bool kIsF64 = DTYPE == 4;
constexpr int kElemBytes = kIsF64 ? 8 : (kIsF32 ? 4 : 2);
using Accum = AccumOf<Elem>;

#if DTYPE == 4
__device__ __forceinline__ double load_elem(const char* p) { return *reinterpret_cast<const double*>(p); }
__device__ __forceinline__ void store_elem(char* p, double x) { *reinterpret_cast<double*>(p) = x; }
#elif DTYPE == 3
__device__ __forceinline__ float load_elem(const char* p) { return *reinterpret_cast<const float*>(p); }
__device__ __forceinline__ void store_elem(char* p, float x) { *reinterpret_cast<float*>(p) = x; }
#else
__device__ __forceinline__ float load_elem(const char* p) { return to_float<Elem>(*reinterpret_cast<const u16*>(p)); }
__device__ __forceinline__ void store_elem(char* p, float x) { *reinterpret_cast<u16*>(p) = from_float<Elem>(x); }
#endif

}  // namespace cuflash
