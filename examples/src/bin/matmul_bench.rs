//! How fast is candle's CPU matmul on this machine, for a square 2048^3 product and for the
//! shapes of a char-small training step (batch 12 x 256 tokens, width 384), including the
//! transposed operands that the backward uses? Prints GFLOP/s per case (median of 5).
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
    ];
    println!("| case | m x k x n | ms | GFLOP/s |\n|---|---|---|---|");
    for (label, m, k, nn, lt, rt) in cases {
        let a = if lt { Tensor::randn(0f32, 1.0, (k, m), &dev)?.t()? } else { Tensor::randn(0f32, 1.0, (m, k), &dev)? };
        let b = if rt { Tensor::randn(0f32, 1.0, (nn, k), &dev)?.t()? } else { Tensor::randn(0f32, 1.0, (k, nn), &dev)? };
        let s = time_matmul(&a, &b)?;
        let gflops = 2.0 * (m * k * nn) as f64 / s / 1e9;
        println!("| {label} | {m} x {k} x {nn} | {:.1} | {gflops:.1} |", s * 1e3);
    }
    Ok(())
}
