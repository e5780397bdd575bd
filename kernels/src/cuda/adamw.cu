// One in-place AdamW step on flat f32 buffers (param, exp_avg, exp_avg_sq) with an f32, bf16 or f16
// gradient, the same arithmetic as kernels::adamw_step on the CPU. The per-step scalars (decay,
// step_size, inv_bc2_sqrt) are computed on the host exactly as there. Every operation is written
// with the _rn intrinsics, which nvcc never contracts into FMAs, so each element rounds exactly as
// the CPU loop does (Rust does not contract either): the GPU step equals the CPU step bitwise for
// the same inputs.
#include "common.cuh"

template <typename G>
__device__ __forceinline__ void adamw_step(float *param, const G *grad, float *exp_avg, float *exp_avg_sq,
                                           size_t n, float beta1, float beta2, float one_minus_beta1,
                                           float one_minus_beta2, float eps, float decay, float step_size,
                                           float inv_bc2_sqrt, float grad_scale) {
    GRID_STRIDE_LOOP(i, n) {
        float g = __fmul_rn(load_f32(grad[i]), grad_scale);
        float m = __fadd_rn(__fmul_rn(beta1, exp_avg[i]), __fmul_rn(one_minus_beta1, g));
        float v = __fadd_rn(__fmul_rn(beta2, exp_avg_sq[i]), __fmul_rn(one_minus_beta2, __fmul_rn(g, g)));
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), inv_bc2_sqrt), eps);
        param[i] = __fsub_rn(__fmul_rn(param[i], decay), __fdiv_rn(__fmul_rn(step_size, m), denom));
    }
}

#define ADAMW_KERNEL(G, SUFFIX)                                                                       \
    extern "C" __global__ void adamw_step_##SUFFIX(                                                   \
        float *param, const G *grad, float *exp_avg, float *exp_avg_sq, size_t n, float beta1,       \
        float beta2, float one_minus_beta1, float one_minus_beta2, float eps, float decay,            \
        float step_size, float inv_bc2_sqrt, float grad_scale) {                                      \
        adamw_step<G>(param, grad, exp_avg, exp_avg_sq, n, beta1, beta2, one_minus_beta1,             \
                      one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt, grad_scale);              \
    }

ADAMW_KERNEL(float, f32)
ADAMW_KERNEL(bf16, bf16)
ADAMW_KERNEL(f16, f16)
