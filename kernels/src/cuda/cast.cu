// y = (T_out)((float)x * scale) for every pair of f32, bf16 and f16: one pass for casts that also
// scale, e.g. unscaling loss-scaled bf16 gradients into f32. Same rounding as kernels::cast_scaled
// on the CPU (one f32 multiply, then round to nearest even).
#include "common.cuh"

template <typename S, typename D>
__device__ __forceinline__ void cast_scaled(const S *x, D *y, size_t n, float scale) {
    GRID_STRIDE_LOOP(i, n) { y[i] = store_as<D>(__fmul_rn(load_f32(x[i]), scale)); }
}

#define CAST_KERNEL(S, SN, D, DN)                                                                \
    extern "C" __global__ void cast_scaled_##SN##_##DN(const S *x, D *y, size_t n, float scale) { \
        cast_scaled<S, D>(x, y, n, scale);                                                       \
    }

CAST_KERNEL(float, f32, float, f32)
CAST_KERNEL(float, f32, bf16, bf16)
CAST_KERNEL(float, f32, f16, f16)
CAST_KERNEL(bf16, bf16, float, f32)
CAST_KERNEL(bf16, bf16, bf16, bf16)
CAST_KERNEL(bf16, bf16, f16, f16)
CAST_KERNEL(f16, f16, float, f32)
CAST_KERNEL(f16, f16, bf16, bf16)
CAST_KERNEL(f16, f16, f16, f16)
