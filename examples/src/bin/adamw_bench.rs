//! Is the fused AdamW step memory-bound? Times `kernels::adamw_step` over 64M f32 parameters
//! (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq: 28 bytes per
//! parameter) and, for the memory ceiling, a STREAM-style triad a = b + s * c (12 bytes per
//! element) on the same rayon pool. Prints GB/s of each (best of 5).
//!
//! cargo run --release -p examples --bin adamw_bench

use rayon::prelude::*;

fn best_of<F: FnMut()>(mut f: F) -> f64 {
    f(); // warm: pages touched, pool started
    (0..5).map(|_| {
        let t0 = std::time::Instant::now();
        f();
        t0.elapsed().as_secs_f64()
    }).fold(f64::INFINITY, f64::min)
}

fn main() {
    zero_candle::cpu::init_compute_threads(0);
    let n = 64 << 20;
    let mut param = vec![0.5f32; n];
    let grad = vec![0.01f32; n];
    let mut m = vec![0.0f32; n];
    let mut v = vec![0.0f32; n];
    let hp = kernels::AdamWHyper { lr: 1e-4, weight_decay: 0.1, ..Default::default() };
    let mut step = 0u64;
    let adamw = best_of(|| {
        step += 1;
        kernels::adamw_step(&mut param, &grad, &mut m, &mut v, &hp, step, 1.0).unwrap();
    });
    let (b, c) = (vec![1.0f32; n], vec![2.0f32; n]);
    let mut a = vec![0.0f32; n];
    let triad = best_of(|| {
        a.par_chunks_mut(1 << 16).zip(b.par_chunks(1 << 16)).zip(c.par_chunks(1 << 16)).for_each(|((a, b), c)| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        });
    });
    let gb = |bytes: f64, s: f64| bytes / s / 1e9;
    println!("| kernel | elements | ms | GB/s |\n|---|---|---|---|");
    println!("| adamw_step (28 B/param) | {n} | {:.1} | {:.1} |", adamw * 1e3, gb(28.0 * n as f64, adamw));
    println!("| triad a = b + s c (12 B/elem) | {n} | {:.1} | {:.1} |", triad * 1e3, gb(12.0 * n as f64, triad));
    println!("{} threads", rayon::current_num_threads());
}
