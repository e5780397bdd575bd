//! Tests for `kernels::adamw_step`: the fused in-place step against the candle-tensor reference over
//! consecutive steps (weight decay and a gradient scale on), a hand-computed first step, decoupled
//! weight decay, PyTorch defaults, argument errors, and an ignored bandwidth measurement; then
//! `adamw_step_tensors` on every device of `kernels::testing::test_devices()` (the CPU, and CUDA with
//! `--features cuda` on a GPU machine) with f32, bf16 and f16 gradients: the same bits as
//! `adamw_step` on the CPU.

use candle_core::{DType, Device, Tensor};
use kernels::testing::{assert_close, test_devices, Tolerance, F32_TOL};
use kernels::{adamw_step, adamw_step_reference, adamw_step_tensors, AdamWHyper};

/// Reproducible uniform values in [offset - scale, offset + scale) (splitmix64).
fn pseudo_random(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    kernels::testing::uniform_values(n, seed).into_iter().map(|u| offset + scale * u as f32).collect()
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn adamw_fast_matches_reference_over_five_steps() {
    let hp = AdamWHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let grad_scale = 0.37;
    for n in [1001, 100_003] {
        let mut p = pseudo_random(n, 1, 1.0, 0.2);
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut rp, mut rm, mut rv) = (t(&p), t(&m), t(&v));
        for step in 1..=5u64 {
            // A fresh gradient each step, spanning several orders of magnitude and some exact zeros.
            let mut g = pseudo_random(n, 100 + step, 3.0, 0.0);
            for (i, gi) in g.iter_mut().enumerate() {
                *gi *= [1.0, 1e-3, 0.0, 10.0][i % 4];
            }
            let before = rp.clone();
            adamw_step(&mut p, &g, &mut m, &mut v, &hp, step, grad_scale).unwrap();
            (rp, rm, rv) =
                adamw_step_reference(&rp, &t(&g), &rm, &rv, &hp, step, grad_scale).unwrap();
            let what = |x: &str| format!("adamw n={n} step={step} {x}");
            assert_close(&t(&p), &rp, F32_TOL, &what("param"));
            assert_close(&t(&m), &rm, F32_TOL, &what("exp_avg"));
            assert_close(&t(&v), &rv, F32_TOL, &what("exp_avg_sq"));
            // The update (about lr = 1e-2) is small next to the parameter: compare it on its own.
            let fast_delta = (t(&p) - &before).unwrap();
            let ref_delta = (&rp - &before).unwrap();
            assert_close(
                &fast_delta,
                &ref_delta,
                Tolerance {
                    rtol: 1e-3,
                    atol: 1e-6,
                },
                &what("update"),
            );
        }
    }
}

#[test]
fn adamw_first_step_matches_hand_computation() {
    // Step 1 with wd = 0: m = (1-b1) g, v = (1-b2) g^2, the bias corrections cancel them, so the
    // update is lr * g / (|g| + eps), i.e. about lr * sign(g) whatever the gradient's magnitude.
    let hp = AdamWHyper {
        weight_decay: 0.0,
        ..AdamWHyper::default()
    };
    let grad_scale = 2.0f32;
    let grad = [0.5f32, -2.0, 1e-3, -7e-5, 0.0, 300.0];
    let mut p = vec![1.0f32, -1.0, 0.25, 3.0, 0.5, 0.0];
    let p0 = p.clone();
    let (mut m, mut v) = (vec![0f32; 6], vec![0f32; 6]);
    adamw_step(&mut p, &grad, &mut m, &mut v, &hp, 1, grad_scale).unwrap();
    for i in 0..grad.len() {
        let g = grad[i] as f64 * grad_scale as f64;
        let expected = p0[i] as f64 - 1e-3 * g / (g.abs() + 1e-8);
        assert!(
            (p[i] as f64 - expected).abs() < 1e-7,
            "param[{i}] = {}, expected {expected}",
            p[i]
        );
        let sign_step = p0[i] as f64 - 1e-3 * g.signum() * (g != 0.0) as u8 as f64;
        assert!(
            (p[i] as f64 - sign_step).abs() < 1e-6,
            "param[{i}] = {}, expected about {sign_step}",
            p[i]
        );
        assert!(
            (m[i] as f64 - 0.1 * g).abs() <= 1e-6 * g.abs(),
            "exp_avg[{i}] = {}",
            m[i]
        );
        assert!(
            (v[i] as f64 - 0.001 * g * g).abs() <= 1e-5 * g * g,
            "exp_avg_sq[{i}] = {}",
            v[i]
        );
    }
}

#[test]
fn adamw_weight_decay_is_decoupled_from_the_gradient() {
    // A zero gradient leaves the moments at zero and the update at 0 / (0 + eps) = 0, so only the
    // decay p *= 1 - lr * wd remains (L2-in-the-gradient Adam would move p by about lr instead).
    let hp = AdamWHyper {
        lr: 0.1,
        weight_decay: 0.5,
        ..AdamWHyper::default()
    };
    let mut p = vec![2.0f32, -4.0, 0.0];
    let (mut m, mut v) = (vec![0f32; 3], vec![0f32; 3]);
    adamw_step(&mut p, &[0.0; 3], &mut m, &mut v, &hp, 3, 1.0).unwrap();
    assert_eq!(p, vec![2.0 * 0.95, -4.0 * 0.95, 0.0]);
    assert_eq!((m, v), (vec![0f32; 3], vec![0f32; 3]));
}

#[test]
fn adamw_hyper_default_matches_pytorch() {
    let hp = AdamWHyper::default();
    assert_eq!(
        (hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay),
        (1e-3, 0.9, 0.999, 1e-8, 0.01)
    );
}

#[test]
fn adamw_rejects_step_zero_and_mismatched_lengths() {
    let hp = AdamWHyper::default();
    let (mut p, mut m, mut v) = (vec![0f32; 10], vec![0f32; 10], vec![0f32; 10]);
    let err = adamw_step(&mut p, &[0.0; 10], &mut m, &mut v, &hp, 0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adamw_step") && err.contains("step") && err.contains('0'),
        "{err}"
    );
    let err = adamw_step(&mut p, &[0.0; 9], &mut m, &mut v, &hp, 1, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param 10") && err.contains("grad 9"), "{err}");
    let mut short_v = vec![0f32; 11];
    let err = adamw_step(&mut p, &[0.0; 10], &mut m, &mut short_v, &hp, 1, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exp_avg_sq 11"), "{err}");
    // Nothing was written by the rejected calls.
    assert!(p.iter().chain(&m).chain(&v).all(|&x| x == 0.0));
    let z = t(&[0.0; 4]);
    let err = adamw_step_reference(&z, &z, &z, &z, &hp, 0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("step"), "{err}");
    let err = adamw_step_reference(&z, &t(&[0.0; 3]), &z, &z, &hp, 1, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad 3"), "{err}");
}

/// The five-step run of `adamw_fast_matches_reference_over_five_steps` through `adamw_step_tensors` on
/// each device and gradient dtype: bitwise equal to `adamw_step` on the CPU slices (same rounding of
/// every operation), and so close to the reference.
#[test]
fn adamw_tensors_match_the_cpu_step_bitwise_on_every_device() {
    let hp = AdamWHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let grad_scale = 0.37;
    for dev in test_devices() {
        for grad_dtype in [DType::F32, DType::BF16, DType::F16] {
            for n in [1, 1001, 100_003] {
                let what = |step: u64, x: &str| format!("adamw_step_tensors {:?} grad {grad_dtype:?} n={n} step={step} {x}", dev.location());
                let mut p = pseudo_random(n, 1, 1.0, 0.2);
                let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                let tp = Tensor::new(p.as_slice(), &dev).unwrap();
                let tm = Tensor::zeros(n, DType::F32, &dev).unwrap();
                let tv = Tensor::zeros(n, DType::F32, &dev).unwrap();
                let (mut rp, mut rm, mut rv) = (t(&p), t(&m), t(&v));
                for step in 1..=5u64 {
                    let mut g = pseudo_random(n, 100 + step, 3.0, 0.0);
                    for (i, gi) in g.iter_mut().enumerate() {
                        *gi *= [1.0, 1e-3, 0.0, 10.0][i % 4];
                    }
                    // The gradient as the step sees it: rounded to its dtype, then widened.
                    let tg = t(&g).to_dtype(grad_dtype).unwrap();
                    let g: Vec<f32> = tg.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
                    adamw_step_tensors(&tp, &tg.to_device(&dev).unwrap(), &tm, &tv, &hp, step, grad_scale).unwrap();
                    adamw_step(&mut p, &g, &mut m, &mut v, &hp, step, grad_scale).unwrap();
                    (rp, rm, rv) = adamw_step_reference(&rp, &t(&g), &rm, &rv, &hp, step, grad_scale).unwrap();
                    for (name, got, cpu, reference) in [("param", &tp, &p, &rp), ("exp_avg", &tm, &m, &rm), ("exp_avg_sq", &tv, &v, &rv)] {
                        let got: Vec<f32> = got.to_vec1().unwrap();
                        if let Some(i) = (0..n).find(|&i| got[i].to_bits() != cpu[i].to_bits()) {
                            panic!("{}: element {i} is {}, adamw_step gives {}", what(step, name), got[i], cpu[i]);
                        }
                        assert_close(&t(&got), reference, F32_TOL, &what(step, name));
                    }
                }
            }
        }
    }
}

#[test]
fn adamw_tensors_reject_bad_arguments() {
    let hp = AdamWHyper::default();
    for dev in test_devices() {
        let z = |n: usize| Tensor::zeros(n, DType::F32, &dev).unwrap();
        let (p, g, m, v) = (z(8), z(8), z(8), z(8));
        let err = adamw_step_tensors(&p, &g, &m, &v, &hp, 0, 1.0).unwrap_err().to_string();
        assert!(err.contains("step"), "{err}");
        let err = adamw_step_tensors(&p, &z(7), &m, &v, &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("grad 7"), "{err}");
        let err = adamw_step_tensors(&p, &g, &m.to_dtype(DType::BF16).unwrap(), &v, &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("exp_avg must be a contiguous f32"), "{err}");
        let err = adamw_step_tensors(&p, &g.to_dtype(DType::F64).unwrap(), &m, &v, &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("grad must be f32, bf16 or f16"), "{err}");
        // Shared storage would deadlock on the storage locks: it is rejected, nothing is written.
        let both = z(16);
        let (lo, hi) = (both.narrow(0, 0, 8).unwrap(), both.narrow(0, 8, 8).unwrap());
        let ones = Tensor::ones(8, DType::F32, &dev).unwrap();
        let err = adamw_step_tensors(&p, &ones, &lo, &hi, &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("exp_avg and exp_avg_sq must not share storage"), "{err}");
        let err = adamw_step_tensors(&p, &p, &m, &v, &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("param and grad must not share storage"), "{err}");
        assert_eq!(both.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
    if test_devices().len() > 1 {
        let cpu = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let gpu = Tensor::zeros(4, DType::F32, &test_devices()[1]).unwrap();
        let err = adamw_step_tensors(&cpu, &gpu, &cpu.copy().unwrap(), &cpu.copy().unwrap(), &hp, 1, 1.0).unwrap_err().to_string();
        assert!(err.contains("grad is on"), "{err}");
    }
}

/// `cargo test --release -p kernels --test adamw -- --ignored --nocapture`
#[test]
#[ignore]
fn adamw_step_bandwidth() {
    let n = 10_000_000;
    let hp = AdamWHyper::default();
    let mut p = pseudo_random(n, 1, 1.0, 0.0);
    let g = pseudo_random(n, 2, 1.0, 0.0);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    adamw_step(&mut p, &g, &mut m, &mut v, &hp, 1, 0.5).unwrap(); // warm-up (page faults)
    let iters = 20;
    let start = std::time::Instant::now();
    for step in 2..2 + iters {
        adamw_step(&mut p, &g, &mut m, &mut v, &hp, step, 0.5).unwrap();
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    // Reads param, grad, m, v and writes param, m, v: 7 x 4 bytes per element.
    let gbps = 28.0 * n as f64 / secs / 1e9;
    println!(
        "adamw_step n={n}: {:.2} ms/step, {gbps:.1} GB/s ({} rayon threads)",
        secs * 1e3,
        rayon::current_num_threads()
    );
    let (tp, tg, tm, tv) = (t(&p), t(&g), t(&m), t(&v));
    let start = std::time::Instant::now();
    for step in 2..2 + 5 {
        adamw_step_reference(&tp, &tg, &tm, &tv, &hp, step, 0.5).unwrap();
    }
    println!(
        "adamw_step_reference n={n}: {:.2} ms/step",
        start.elapsed().as_secs_f64() * 1e3 / 5.0
    );
}
