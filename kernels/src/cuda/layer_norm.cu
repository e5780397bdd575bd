// LayerNorm over the last dimension (biased variance, eps inside the square root): forward and
// backward, the same formulas as kernels/src/layer_norm.rs, arithmetic in f32.
//
// Forward: one block per row; mean, then the variance of the centred row (two passes, as the CPU
// kernel), y = (x - mean) * rstd * w + b.
// Backward, deterministic (no atomics), in two kernels:
// 1. layer_norm_bwd_<T>: block b handles rows b, b + gridDim.x, ...; per row it recomputes mean and
//    rstd from x, writes dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with
//    dxhat = dy * w, and adds dy * xhat (dweight) and dy (dbias) into its own accumulators: shared
//    memory when `acc_in_shared` (2 * c floats of dynamic shared memory), else its own row of
//    `partial` directly. Each accumulator column is read and written by one thread only (the one
//    that owns that column of the row), so no synchronization is needed around them. At the end
//    block b's sums are in partial[b * 2c .. (b + 1) * 2c] (dweight, then dbias).
// 2. layer_norm_bwd_reduce_<T>: sums the `blocks` partial rows per column in a fixed order and
//    writes dweight (columns < c) and dbias (columns >= c) as T.
// Launch: blockDim.x must be a multiple of 32 (full-warp shuffles), at most 1024.
#include "common.cuh"

// Sum of v over the block, returned to every thread (every thread adds the per-warp sums in the same
// order, so all get the same value). `red` holds 32 floats; it may be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads(); // the previous call's readers are done with `red`
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; i++) total += red[i];
    return total;
}

// Two sums at once (one pair of barriers): `red` holds 64 floats.
__device__ __forceinline__ float2 block_sum2(float a, float b, float *red) {
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        red[warp] = a;
        red[32 + warp] = b;
    }
    __syncthreads();
    float2 total = make_float2(0.0f, 0.0f);
    for (int i = 0; i < warps; i++) {
        total.x += red[i];
        total.y += red[32 + i];
    }
    return total;
}

// Mean and 1/std of one row (two passes over it, as the CPU's load_row_stats).
template <typename T>
__device__ __forceinline__ float2 row_stats(const T *xr, size_t c, float eps, float *red) {
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) s += load_f32(xr[j]);
    const float mean = block_sum(s, red) / (float)c;
    float v = 0.0f;
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float d = load_f32(xr[j]) - mean;
        v += d * d;
    }
    const float var = block_sum(v, red) / (float)c;
    return make_float2(mean, 1.0f / sqrtf(var + eps));
}

template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T *x, const T *w, const T *b, T *y, size_t rows, size_t c,
                                               float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    if (row >= rows) return; // whole block: no thread reaches a barrier
    const T *xr = x + row * c;
    T *yr = y + row * c;
    const float2 st = row_stats(xr, c, eps, red);
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
        yr[j] = store_as<T>((load_f32(xr[j]) - st.x) * st.y * load_f32(w[j]) + load_f32(b[j]));
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd(const T *x, const T *w, const T *dy, T *dx, float *partial,
                                               size_t rows, size_t c, float eps, unsigned int acc_in_shared) {
    extern __shared__ float acc_shared[];
    __shared__ float red[64];
    float *own = partial + (size_t)blockIdx.x * 2 * c;
    float *acc = acc_in_shared ? acc_shared : own;
    // dweight in acc[0, c), dbias in acc[c, 2c); thread t owns columns t, t + blockDim.x, ...
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
        acc[j] = 0.0f;
        acc[c + j] = 0.0f;
    }
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + row * c;
        const T *gr = dy + row * c;
        T *dxr = dx + row * c;
        const float2 st = row_stats(xr, c, eps, red);
        const float mean = st.x, rstd = st.y;
        float s_d = 0.0f, s_dxh = 0.0f;
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
            const float xh = (load_f32(xr[j]) - mean) * rstd;
            const float g = load_f32(gr[j]);
            const float d = g * load_f32(w[j]);
            s_d += d;
            s_dxh += d * xh;
            acc[j] += g * xh;
            acc[c + j] += g;
        }
        const float2 sums = block_sum2(s_d, s_dxh, red);
        const float mean_d = sums.x / (float)c, mean_dxh = sums.y / (float)c;
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
            const float xh = (load_f32(xr[j]) - mean) * rstd;
            const float d = load_f32(gr[j]) * load_f32(w[j]);
            dxr[j] = store_as<T>(rstd * (d - mean_d - xh * mean_dxh));
        }
    }
    if (acc_in_shared) {
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
            own[j] = acc[j];
            own[c + j] = acc[c + j];
        }
    }
}

// blockDim (32, ny): threadIdx.x picks the column within a tile of 32, threadIdx.y strides over
// the partial rows; then lane y = 0 adds the ny sums in order. Deterministic for a given launch.
template <typename T>
__device__ __forceinline__ void layer_norm_bwd_reduce(const float *partial, size_t blocks, size_t c, T *dw, T *db) {
    __shared__ float tile[32][33];
    const size_t width = 2 * c;
    const size_t col = (size_t)blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < width) {
        for (size_t b = threadIdx.y; b < blocks; b += blockDim.y) s += partial[b * width + col];
    }
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < width) {
        float t = 0.0f;
        for (unsigned int i = 0; i < blockDim.y; i++) t += tile[i][threadIdx.x];
        if (col < c) {
            dw[col] = store_as<T>(t);
        } else {
            db[col - c] = store_as<T>(t);
        }
    }
}

#define LAYER_NORM_KERNELS(T, SUFFIX)                                                                        \
    extern "C" __global__ void layer_norm_fwd_##SUFFIX(const T *x, const T *w, const T *b, T *y, size_t rows,  \
                                                       size_t c, float eps) {                                 \
        layer_norm_fwd<T>(x, w, b, y, rows, c, eps);                                                          \
    }                                                                                                         \
    extern "C" __global__ void layer_norm_bwd_##SUFFIX(const T *x, const T *w, const T *dy, T *dx,            \
                                                       float *partial, size_t rows, size_t c, float eps,      \
                                                       unsigned int acc_in_shared) {                          \
        layer_norm_bwd<T>(x, w, dy, dx, partial, rows, c, eps, acc_in_shared);                                \
    }                                                                                                         \
    extern "C" __global__ void layer_norm_bwd_reduce_##SUFFIX(const float *partial, size_t blocks, size_t c,  \
                                                              T *dw, T *db) {                                 \
        layer_norm_bwd_reduce<T>(partial, blocks, c, dw, db);                                                 \
    }

LAYER_NORM_KERNELS(float, f32)
LAYER_NORM_KERNELS(bf16, bf16)
LAYER_NORM_KERNELS(f16, f16)
