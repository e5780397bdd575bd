//! How fast is candle's CPU matmul on this machine, for a square 2048^3 product and for the
//! shapes of a char-small training step (batch 12 x 256 tokens, width 384), including the
//! transposed operands that the backward uses? Prints GFLOP/s per case (median of 5).
//!
//! Next to candle's f32 product it times kernels::gemm::matmul_bf16 (AMX, bf16 inputs, f32 sums)
//! on the same shapes when the CPU has AMX.
//!
//! cargo run --release -p examples --bin matmul_bench

use candle_core::{Device, Tensor};

fn time_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..6 {
        let t0 = std::time::Instant::now();
        let c = a.matmul(b)?;
        c.dims(); // keep the result alive until timed
        times.push(t0.elapsed().as_secs_f64());
    }
    times.remove(0); // warmup
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The same product through the AMX path, reading candle's storage in place (strides as given).
fn time_amx(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    use kernels::gemm::{matmul_bf16, MatRef};
    let view = |t: &Tensor| -> candle_core::Result<(Vec<f32>, bool)> {
        // A transposed view is read as the transpose of its contiguous source.
        let transposed = !t.is_contiguous();
        let src = if transposed { t.t()?.contiguous()? } else { t.clone() };
        Ok((src.flatten_all()?.to_vec1::<f32>()?, transposed))
    };
    let ((ad, at), (bd, bt)) = (view(a)?, view(b)?);
    let (m, k) = a.dims2()?;
    let n = b.dim(1)?;
    fn mat(d: &[f32], r: usize, c: usize, t: bool) -> MatRef<'_> {
        if t { MatRef::new(d, c, r).t() } else { MatRef::new(d, r, c) }
    }
    let mut c = vec![0f32; m * n];
    let mut times = Vec::new();
    for _ in 0..6 {
        let t0 = std::time::Instant::now();
        if std::env::var("F32").is_ok() {
            unsafe { kernels::gemm_f32::matmul_f32(mat(&ad, m, k, at), mat(&bd, k, n, bt), c.as_mut_ptr(), n, false, true) };
        } else {
            matmul_bf16(mat(&ad, m, k, at), mat(&bd, k, n, bt), &mut c, n, false);
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (n, c) = (12 * 256, 384);
    // (label, m, k, n, lhs transposed, rhs transposed)
    let cases = [
        ("square 2048", 2048, 2048, 2048, false, false),
        ("qkv fwd   x@W", n, c, 3 * c, false, false),
        ("mlp fwd   x@W", n, c, 4 * c, false, false),
        ("mlp bwd   g@W^T", n, 4 * c, c, false, true),
        ("mlp bwd   x^T@g", c, n, 4 * c, true, false),
        ("head fwd  x@E^T (V=65)", n, c, 65, false, true),
        ("gpt2-124m mlp fwd", 1024, 768, 3072, false, true),
        ("gpt2-124m head fwd", 1024, 768, 50304, false, true),
    ];
    zero_candle::cpu::init_compute_threads(0);
    let amx = kernels::gemm::amx_available();
    println!("| case | m x k x n | candle f32 ms | GFLOP/s | AMX bf16 ms | GFLOP/s |\n|---|---|---|---|---|---|");
    for (label, m, k, nn, lt, rt) in cases {
        let a = if lt { Tensor::randn(0f32, 1.0, (k, m), &dev)?.t()? } else { Tensor::randn(0f32, 1.0, (m, k), &dev)? };
        let b = if rt { Tensor::randn(0f32, 1.0, (nn, k), &dev)?.t()? } else { Tensor::randn(0f32, 1.0, (k, nn), &dev)? };
        let s = time_matmul(&a, &b)?;
        let gflops = 2.0 * (m * k * nn) as f64 / s / 1e9;
        let amx_cols = if amx {
            let s = time_amx(&a, &b)?;
            format!("{:.2} | {:.1}", s * 1e3, 2.0 * (m * k * nn) as f64 / s / 1e9)
        } else {
            "- | no AMX".to_string()
        };
        println!("| {label} | {m} x {k} x {nn} | {:.1} | {gflops:.1} | {amx_cols} |", s * 1e3);
    }
    Ok(())
}
