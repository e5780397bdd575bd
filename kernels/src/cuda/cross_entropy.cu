// Fused cross-entropy over the vocabulary, forward and backward: the same formulas as
// kernels/src/cross_entropy.rs. Logits are (rows, V), targets u32 per row, IGNORE_INDEX (u32::MAX)
// rows count for nothing. The host has already checked every target (< V or IGNORE_INDEX) and
// resolved the divisor; the kernels still never index past a row.
//   per row:  m = max_j x_j, s = sum_j exp(x_j - m)
//   forward:  loss_row = m + log(s) - x_t (0 for ignored rows); loss = (float)(sum_rows (double)loss_row / divisor)
//   backward: scale = (float)((double)grad / divisor), k = scale / s,
//             dx_j = exp(x_j - m) * k, dx_t = exp(x_t - m) * k - scale (all 0 for ignored rows)
// Row kernels: one block per row (blockDim.x a multiple of 32, at most 1024), threads stride over the
// row (V = 50257 for GPT-2), block reductions for the max and the sum. The loss is reduced
// deterministically: per-row f32 losses, then one block sums them in f64 in a fixed order.
#include "common.cuh"

#define IGNORE_INDEX 0xffffffffu

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
    template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};

// Reduces v over the block with op; every thread gets the result (lane 0 of warp 0's value, so the
// order depends only on blockDim.x: deterministic). Must be reached by every thread of the block.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity) {
    __shared__ V partial[32];
    __shared__ V result;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? partial[lane] : identity;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
        if (lane == 0) result = v;
    }
    // Also keeps the next call's writes to partial/result behind every thread's read of this one.
    __syncthreads();
    return result;
}

// (max, sum of exp(x - max)) of one row of v elements, on every thread of the block.
template <typename T>
__device__ __forceinline__ void row_max_sum(const T *x, size_t v, float &m, float &s) {
    float mt = -INFINITY;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) mt = fmaxf(mt, load_f32(x[j]));
    m = block_reduce(mt, MaxOp(), -INFINITY);
    float st = 0.0f;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) st += expf(load_f32(x[j]) - m);
    s = block_reduce(st, AddOp(), 0.0f);
}

template <typename T>
__device__ __forceinline__ void cross_entropy_fwd(const T *logits, const uint32_t *targets, float *row_loss, size_t v) {
    const size_t row = blockIdx.x;
    const uint32_t t = targets[row];
    // t is the same for the whole block, so the early return is uniform (no reduction is skipped
    // by part of the block).
    if (t == IGNORE_INDEX) {
        if (threadIdx.x == 0) row_loss[row] = 0.0f;
        return;
    }
    const T *x = logits + row * v;
    float m, s;
    row_max_sum(x, v, m, s);
    if (threadIdx.x == 0) row_loss[row] = (size_t)t < v ? m + logf(s) - load_f32(x[t]) : NAN;
}

template <typename T>
__device__ __forceinline__ void cross_entropy_bwd(const T *logits, const uint32_t *targets, const float *grad,
                                                  T *dlogits, size_t v, double divisor) {
    const size_t row = blockIdx.x;
    const uint32_t t = targets[row];
    const T *x = logits + row * v;
    T *dx = dlogits + row * v;
    if (t == IGNORE_INDEX) {
        for (size_t j = threadIdx.x; j < v; j += blockDim.x) dx[j] = store_as<T>(0.0f);
        return;
    }
    float m, s;
    row_max_sum(x, v, m, s);
    const float scale = (float)((double)grad[0] / divisor);
    const float k = scale / s;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
        const float ek = __fmul_rn(expf(load_f32(x[j]) - m), k);
        dx[j] = store_as<T>(j == (size_t)t ? ek - scale : ek);
    }
}

// Grid: one block per row; row_loss has one f32 per row.
// Gradient: same grid; grad is the f32 scalar upstream gradient (device memory).
#define CROSS_ENTROPY_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void cross_entropy_fwd_##SUFFIX(const T *logits, const uint32_t *targets,        \
                                                          float *row_loss, size_t v) {                     \
        cross_entropy_fwd<T>(logits, targets, row_loss, v);                                                \
    }                                                                                                      \
    extern "C" __global__ void cross_entropy_bwd_##SUFFIX(const T *logits, const uint32_t *targets,        \
                                                          const float *grad, T *dlogits, size_t v,         \
                                                          double divisor) {                                \
        cross_entropy_bwd<T>(logits, targets, grad, dlogits, v, divisor);                                  \
    }

CROSS_ENTROPY_KERNELS(float, f32)
CROSS_ENTROPY_KERNELS(bf16, bf16)
CROSS_ENTROPY_KERNELS(f16, f16)

// One block: loss[0] = (float)(sum_i (double)row_loss[i] / divisor), summed in a fixed order
// (thread-strided f64 partials, then the block reduction), so the loss is bitwise reproducible.
extern "C" __global__ void cross_entropy_loss_sum(const float *row_loss, size_t n, double divisor, float *loss) {
    double acc = 0.0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)row_loss[i];
    acc = block_reduce(acc, AddOp(), 0.0);
    if (threadIdx.x == 0) loss[0] = (float)(acc / divisor);
}
