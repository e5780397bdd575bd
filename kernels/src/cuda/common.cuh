// Shared by every kernel in kernels/src/cuda/*.cu (each .cu is compiled to its own PTX module by
// kernels/build.rs). Arithmetic is always f32, as in the CPU kernels: load widens, store narrows with
// round-to-nearest-even (what half::bf16::from_f32 / half::f16::from_f32 do on the CPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Load any supported element as f32.
__device__ __forceinline__ float load_f32(float x) { return x; }
__device__ __forceinline__ float load_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load_f32(__half x) { return __half2float(x); }

// Store an f32 as T (rounded to nearest even).
template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }

// Grid-stride loop over n elements (pairs with kernels::cuda::elementwise_config on the Rust side).
#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)blockDim.x * gridDim.x)

// Type names used in exported kernel names: <op>_<suffix>, e.g. gelu_fwd_bf16.
typedef __nv_bfloat16 bf16;
typedef __half f16;
