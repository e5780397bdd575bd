//! Tests for `cross_entropy`: the reference once against central finite differences in f64, then
//! the fused op (loss and logits gradient, with and without an upstream scale and a divisor)
//! against the reference in f32 and bf16 at odd sizes with ignored targets, plus a known value,
//! divisor semantics, the all-ignored case and the error messages. An `#[ignore]`d timing test
//! compares fast and reference fwd+bwd at GPT-2-like sizes. The fused op runs on every device of
//! `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a GPU machine),
//! always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{assert_close, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL};
use kernels::{cross_entropy, cross_entropy_reference, IGNORE_INDEX};

type Loss = fn(&Tensor, &Tensor, Option<f64>) -> Result<Tensor>;

/// Deterministic values in [-scale, scale) (splitmix64), so failures reproduce.
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| u as f32 * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Targets of the given shape in 0..v, with every `ignore_every`-th one IGNORE_INDEX.
fn targets(shape: &[usize], v: usize, seed: u64, ignore_every: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<u32> = (0..n)
        .map(|i| if i % ignore_every == ignore_every - 1 { IGNORE_INDEX } else { ((i as u64 * 7919 + seed * 104_729) % v as u64) as u32 })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Loss, and gradient of `upstream * loss` with respect to the logits (as a Var).
fn loss_and_grad(f: Loss, logits: &Tensor, targets: &Tensor, divisor: Option<f64>, upstream: f64) -> (f32, Tensor) {
    loss_and_grad_on(f, logits, targets, divisor, upstream, &Device::Cpu)
}

/// `loss_and_grad` with logits and targets on `dev`; the gradient comes back on the CPU (after
/// checking that loss and gradient were computed on `dev`).
fn loss_and_grad_on(f: Loss, logits: &Tensor, targets: &Tensor, divisor: Option<f64>, upstream: f64, dev: &Device) -> (f32, Tensor) {
    let var = Var::from_tensor(&logits.to_device(dev).unwrap()).unwrap();
    let loss = f(var.as_tensor(), &targets.to_device(dev).unwrap(), divisor).unwrap();
    assert_eq!((loss.dtype(), loss.rank()), (DType::F32, 0), "loss must be a scalar f32");
    let grads = if upstream == 1.0 { loss.backward() } else { (&loss * upstream).unwrap().backward() }.unwrap();
    let grad = grads.get(var.as_tensor()).expect("missing logits gradient").clone();
    assert!(loss.device().same_device(dev) && grad.device().same_device(dev), "loss and gradient on {:?}", dev.location());
    (loss.to_scalar::<f32>().unwrap(), grad.to_device(&Device::Cpu).unwrap())
}

/// The reference on the CPU, then the fused op on every test device, each with a name.
fn ops_and_devices() -> Vec<(String, Loss, Device)> {
    let mut cases = vec![("reference".to_string(), cross_entropy_reference as Loss, Device::Cpu)];
    cases.extend(test_devices().into_iter().map(|dev| (format!("fused on {:?}", dev.location()), cross_entropy as Loss, dev)));
    cases
}

fn scalar(x: f32) -> Tensor {
    Tensor::new(x, &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy_reference_gradient_matches_finite_differences_f64() {
    let logits = rand(&[3, 5], 1, 2.0).to_dtype(DType::F64).unwrap();
    let t = Tensor::new(&[4u32, IGNORE_INDEX, 0], &Device::Cpu).unwrap();
    for divisor in [None, Some(2.5)] {
        let var = Var::from_tensor(&logits).unwrap();
        let grads = cross_entropy_reference(var.as_tensor(), &t, divisor).unwrap().backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        let fd = finite_difference_grad(&logits, 1e-6, |x| cross_entropy_reference(x, &t, divisor)?.to_scalar::<f64>()).unwrap();
        assert_close(grad, &fd, Tolerance { rtol: 1e-5, atol: 1e-7 }, &format!("finite differences, divisor {divisor:?}"));
        let ignored_row = grad.get(1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(ignored_row, 0.0, "ignored row must get zero gradient");
    }
}

/// Fast vs reference (on the same rounded logits, widened to f32) for loss and gradient, with
/// the default divisor and with an explicit one plus an upstream scale of V (which makes the
/// gradient entries O(1), so that the bf16 tolerance is not vacuous).
fn check_against_reference(shape: &[usize], seed: u64, dtype: DType, tol: Tolerance) {
    let v = shape[shape.len() - 1];
    let logits = rand(shape, seed, 4.0).to_dtype(dtype).unwrap();
    let logits_ref = logits.to_dtype(DType::F32).unwrap();
    let t = targets(&shape[..shape.len() - 1], v, seed, 5);
    for (divisor, upstream) in [(None, 1.0), (Some(3.0), v as f64)] {
        let (loss_ref, grad_ref) = loss_and_grad(cross_entropy_reference, &logits_ref, &t, divisor, upstream);
        for dev in test_devices() {
            let what = format!("{shape:?} {dtype:?} divisor {divisor:?} upstream {upstream} on {:?}", dev.location());
            let (loss, grad) = loss_and_grad_on(cross_entropy, &logits, &t, divisor, upstream, &dev);
            // Both compute the loss in f32 from identical values: only summation order differs.
            assert_close(&scalar(loss), &scalar(loss_ref), F32_TOL, &format!("loss {what}"));
            assert_eq!(grad.dtype(), dtype, "gradient dtype {what}");
            assert_close(&grad, &grad_ref, tol, &format!("gradient {what}"));
        }
    }
}

#[test]
fn cross_entropy_loss_and_gradient_match_reference_f32() {
    check_against_reference(&[37, 67], 10, DType::F32, F32_TOL);
    check_against_reference(&[3, 7, 1001], 11, DType::F32, F32_TOL);
}

#[test]
fn cross_entropy_gpt2_vocabulary_matches_reference() {
    // V = 50257: rows far longer than one CUDA block (about 100 logits per thread).
    check_against_reference(&[2, 3, 50257], 12, DType::F32, F32_TOL);
    check_against_reference(&[5, 50257], 22, DType::BF16, BF16_TOL);
}

#[test]
fn cross_entropy_loss_is_reproducible() {
    // The same inputs give the bitwise same loss and gradient (the CUDA loss is summed in a fixed
    // order; the CPU's f64 sum rounds to the same f32 here).
    let logits = rand(&[37, 1001], 90, 4.0);
    let t = targets(&[37], 1001, 90, 5);
    for dev in test_devices() {
        let (loss1, grad1) = loss_and_grad_on(cross_entropy, &logits, &t, None, 1.0, &dev);
        let (loss2, grad2) = loss_and_grad_on(cross_entropy, &logits, &t, None, 1.0, &dev);
        assert_eq!(loss1.to_bits(), loss2.to_bits(), "loss on {:?}", dev.location());
        let bits = |g: &Tensor| g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&grad1) == bits(&grad2), "gradient on {:?}", dev.location());
    }
}

#[test]
fn cross_entropy_loss_and_gradient_match_reference_bf16() {
    check_against_reference(&[37, 67], 20, DType::BF16, BF16_TOL);
    check_against_reference(&[3, 7, 1001], 21, DType::BF16, BF16_TOL);
}

#[test]
fn cross_entropy_loss_and_gradient_match_reference_f16() {
    check_against_reference(&[5, 3, 67], 30, DType::F16, BF16_TOL);
}

#[test]
fn cross_entropy_of_uniform_logits_is_log_vocab_size() {
    let (n, v) = (9, 50);
    let logits = Tensor::full(0.3f32, (n, v), &Device::Cpu).unwrap();
    let t = targets(&[n], v, 3, 4);
    for dev in test_devices() {
        let on = format!("on {:?}", dev.location());
        let (loss, grad) = loss_and_grad_on(cross_entropy, &logits, &t, None, 1.0, &dev);
        assert!((loss - (v as f32).ln()).abs() < 1e-5, "loss {loss} {on}, expected ln {v} = {}", (v as f32).ln());
        // Row 0 (target not ignored): softmax = 1/V everywhere, minus 1 at the target, over 7 rows.
        let row0 = grad.get(0).unwrap().to_vec1::<f32>().unwrap();
        let t0 = t.get(0).unwrap().to_scalar::<u32>().unwrap() as usize;
        let counted = 7.0; // 9 rows, rows 3 and 7 ignored
        for (j, g) in row0.iter().enumerate() {
            let expected = (1.0 / v as f32 - if j == t0 { 1.0 } else { 0.0 }) / counted;
            assert!((g - expected).abs() < 1e-6, "grad[0][{j}] = {g} {on}, expected {expected}");
        }
    }
}

#[test]
fn cross_entropy_divisor_divides_the_summed_loss_and_gradient() {
    let logits = rand(&[4, 6, 67], 40, 3.0);
    let t = targets(&[4, 6], 67, 40, 4);
    let counted = t.flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().filter(|&&x| x != IGNORE_INDEX).count();
    assert_eq!(counted, 18);
    for (name, f, dev) in ops_and_devices() {
        let (sum, grad_sum) = loss_and_grad_on(f, &logits, &t, Some(1.0), 1.0, &dev);
        let (mean, grad_mean) = loss_and_grad_on(f, &logits, &t, None, 1.0, &dev);
        let (div, grad_div) = loss_and_grad_on(f, &logits, &t, Some(1000.0), 1.0, &dev);
        assert!((mean - sum / counted as f32).abs() < 1e-5 * sum, "{name}: default divisor is the counted rows: {mean} vs {sum}/{counted}");
        assert!((div - sum / 1000.0).abs() < 1e-6 * sum, "{name}: explicit divisor: {div} vs {sum}/1000");
        assert_close(&grad_mean, &(&grad_sum / counted as f64).unwrap(), F32_TOL, &format!("{name}: gradient with the default divisor"));
        assert_close(&grad_div, &(&grad_sum / 1000.0).unwrap(), F32_TOL, &format!("{name}: gradient with divisor 1000"));
    }
    for dev in test_devices() {
        let err = cross_entropy(&logits.to_device(&dev).unwrap(), &t.to_device(&dev).unwrap(), Some(0.0)).unwrap_err().to_string();
        assert!(err.contains("divisor") && err.contains('0'), "{err}");
    }
}

#[test]
fn cross_entropy_all_ignored_gives_zero_loss_and_zero_gradient() {
    let logits = rand(&[2, 3, 11], 50, 3.0);
    let t = Tensor::full(IGNORE_INDEX, (2, 3), &Device::Cpu).unwrap();
    for (name, f, dev) in ops_and_devices() {
        for divisor in [None, Some(8.0)] {
            let (loss, grad) = loss_and_grad_on(f, &logits, &t, divisor, 2.0, &dev);
            assert_eq!(loss, 0.0, "{name}: loss with divisor {divisor:?}");
            let max = grad.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(max, 0.0, "{name}: gradient with divisor {divisor:?}");
        }
    }
}

#[test]
fn cross_entropy_rejects_out_of_range_target_naming_row_target_and_vocab() {
    let logits = rand(&[6, 67], 60, 1.0);
    let t = Tensor::new(&[0u32, 66, IGNORE_INDEX, 3, 67, 1], &Device::Cpu).unwrap();
    for (name, f, dev) in ops_and_devices() {
        let (logits, t) = (logits.to_device(&dev).unwrap(), t.to_device(&dev).unwrap());
        let err = f(&logits, &t, None).and_then(|l| l.to_scalar::<f32>()).unwrap_err().to_string();
        assert!(err.contains("row 4") && err.contains("target 67") && err.contains("V = 67"), "{name}: {err}");
    }
}

#[test]
fn cross_entropy_rejects_mismatched_shapes_naming_both() {
    let cases: [(&[usize], &[usize]); 4] = [(&[4, 10], &[5]), (&[2, 3, 10], &[3, 2]), (&[2, 3, 10], &[6]), (&[10], &[])];
    for (name, f, dev) in ops_and_devices() {
        for (ls, ts) in cases {
            let logits = rand(ls, 70, 1.0).to_device(&dev).unwrap();
            let t = Tensor::zeros(ts, DType::U32, &dev).unwrap();
            let err = f(&logits, &t, None).unwrap_err().to_string();
            assert!(err.contains(&format!("{ls:?}")) && err.contains(&format!("{ts:?}")), "{name}: {err}");
        }
    }
    for dev in test_devices() {
        let err = cross_entropy(&rand(&[4, 10], 71, 1.0).to_device(&dev).unwrap(), &Tensor::zeros(4, DType::F32, &dev).unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("u32"), "{err}");
    }
}

/// Rough speed of fwd+bwd (run with `-- --ignored --nocapture`).
#[test]
#[ignore]
fn cross_entropy_timing_fast_vs_reference_f32() {
    for (n, v) in [(12 * 256, 65), (4 * 256, 50257)] {
        let logits = rand(&[n, v], 80, 4.0);
        let t = targets(&[n], v, 80, 100);
        for (name, f) in [("fast", cross_entropy as Loss), ("reference", cross_entropy_reference)] {
            loss_and_grad(f, &logits, &t, None, 1.0); // warm-up
            let iters = 3;
            let start = std::time::Instant::now();
            for _ in 0..iters {
                loss_and_grad(f, &logits, &t, None, 1.0);
            }
            println!("cross_entropy {name} f32 fwd+bwd ({n}, {v}): {:.1} ms/iter", start.elapsed().as_secs_f64() * 1e3 / iters as f64);
        }
    }
}

/// The in-place backward gives the same loss and bitwise the same gradient as `cross_entropy`,
/// and leaves that gradient in the logits' storage (which is why only temporaries may use it).
#[test]
fn reusing_logits_matches_cross_entropy() {
    use candle_core::{Device, Tensor, Var};
    let (rows, v) = (9, 53);
    let values: Vec<f32> = kernels::testing::uniform_values(rows * v, 77).into_iter().map(|u| 4.0 * u as f32).collect();
    let mut ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % v as u32).collect();
    ids[3] = kernels::IGNORE_INDEX;
    let targets = Tensor::from_vec(ids, rows, &Device::Cpu).unwrap();
    for divisor in [None, Some(5.0)] {
        let run = |reuse: bool| {
            let x = Var::from_tensor(&Tensor::from_vec(values.clone(), (rows, v), &Device::Cpu).unwrap()).unwrap();
            // A copy that goes through the graph like a head's logits (not the leaf itself).
            let logits = (x.as_tensor() * 1.0).unwrap();
            let loss = if reuse {
                kernels::cross_entropy_reusing_logits(&logits, &targets, divisor).unwrap()
            } else {
                kernels::cross_entropy(&logits, &targets, divisor).unwrap()
            };
            let grads = (&loss * 3.0).unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (loss.to_scalar::<f32>().unwrap(), g, logits.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let (loss_a, grad_a, logits_a) = run(false);
        let (loss_b, grad_b, logits_b) = run(true);
        assert_eq!(loss_a, loss_b, "loss, divisor {divisor:?}");
        assert_eq!(grad_a, grad_b, "gradient, divisor {divisor:?}");
        assert_eq!(logits_a, values, "cross_entropy must leave its logits alone");
        assert_eq!(logits_b, grad_b, "the reusing version leaves the gradient in the logits");
    }
}
