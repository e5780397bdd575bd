//! Tests for `causal_softmax` and `causal_attention`: each reference once against central finite
//! differences in f64, then the fast paths (forward and every gradient) against the references
//! in f32 and bf16 at odd sizes, plus the causal-mask properties and shape errors. An `#[ignore]`d
//! timing test compares fast and reference fwd+bwd at GPT-2-small-like sizes. The fast-path tests
//! run on every device of `kernels::testing::test_devices()` (the CPU, and CUDA with
//! `--features cuda` on a GPU machine), always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{assert_close, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL};
use kernels::{causal_attention, causal_attention_reference, causal_softmax, causal_softmax_reference};

type Op3 = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// f64 finite differences are accurate to ~1e-10; this leaves room for f32 conversion in closeness.
const FD_TOL: Tolerance = Tolerance { rtol: 1e-5, atol: 1e-7 };

/// Deterministic values in [-scale, scale) (splitmix64), so failures reproduce.
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| u as f32 * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Output of `f` on fresh Vars built from `inputs`, and the gradient of sum(y * g) for each input.
fn forward_and_grads(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], g: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).unwrap();
    let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars.iter().map(|v| grads.get(v.as_tensor()).expect("missing gradient").clone()).collect();
    (y, gs)
}

/// Copies a result to the CPU after checking that it lives on `dev`.
fn on_cpu(t: &Tensor, dev: &Device, what: &str) -> Tensor {
    assert!(t.device().same_device(dev), "{what} on {:?}, expected {:?}", t.device().location(), dev.location());
    t.to_device(&Device::Cpu).unwrap()
}

/// Compares fast (on every test device) and reference (f32 on the CPU, on the same rounded inputs)
/// for forward and all gradients.
fn check_against_reference(
    fast: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs_f32: &[Tensor],
    g_f32: &Tensor,
    dtype: DType,
    tol: Tolerance,
    name: &str,
) {
    let inputs: Vec<Tensor> = inputs_f32.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let g = g_f32.to_dtype(dtype).unwrap();
    // The reference sees exactly the rounded values the fast path sees, widened to f32.
    let inputs_ref: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    let g_ref = g.to_dtype(DType::F32).unwrap();
    let (y_ref, grads_ref) = forward_and_grads(reference, &inputs_ref, &g_ref);
    for dev in test_devices() {
        let on = format!("{name} on {:?}", dev.location());
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_device(&dev).unwrap()).collect();
        let (y, grads) = forward_and_grads(fast, &inputs, &g.to_device(&dev).unwrap());
        assert_eq!(y.dtype(), dtype, "{on}: output dtype");
        assert_close(&on_cpu(&y, &dev, &on), &y_ref, tol, &format!("{on} forward"));
        for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            assert_eq!(a.dtype(), dtype, "{on}: gradient {i} dtype");
            assert_close(&on_cpu(a, &dev, &on), b, tol, &format!("{on} gradient of input {i}"));
        }
    }
}

fn softmax_fast(x: &[Tensor]) -> Result<Tensor> {
    causal_softmax(&x[0], 0.37)
}
fn softmax_ref(x: &[Tensor]) -> Result<Tensor> {
    causal_softmax_reference(&x[0], 0.37)
}
fn attention_fast(x: &[Tensor]) -> Result<Tensor> {
    causal_attention(&x[0], &x[1], &x[2])
}
fn attention_ref(x: &[Tensor]) -> Result<Tensor> {
    causal_attention_reference(&x[0], &x[1], &x[2])
}

/// Checks d sum(f(x) * g) / dx of an f64 reference against central differences for each input.
fn check_finite_differences(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], g: &Tensor) {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let g = g.to_dtype(DType::F64).unwrap();
    let (_, grads) = forward_and_grads(f, &inputs, &g);
    for i in 0..inputs.len() {
        let fd = finite_difference_grad(&inputs[i], 1e-6, |xi| {
            let mut xs = inputs.clone();
            xs[i] = xi.clone();
            (f(&xs)? * &g)?.sum_all()?.to_scalar::<f64>()
        })
        .unwrap();
        assert_close(&grads[i], &fd, FD_TOL, &format!("finite differences, input {i}"));
    }
}

#[test]
fn causal_softmax_reference_gradient_matches_finite_differences_f64() {
    check_finite_differences(&softmax_ref, &[rand(&[2, 4, 4], 1, 2.0)], &rand(&[2, 4, 4], 2, 1.0));
}

#[test]
fn causal_attention_reference_gradients_match_finite_differences_f64() {
    let (q, k, v) = (rand(&[1, 2, 4, 3], 3, 1.5), rand(&[1, 2, 4, 3], 4, 1.5), rand(&[1, 2, 4, 3], 5, 1.0));
    check_finite_differences(&attention_ref, &[q, k, v], &rand(&[1, 2, 4, 3], 6, 1.0));
}

#[test]
fn causal_softmax_forward_and_gradient_match_reference_f32() {
    let s = rand(&[2, 3, 13, 13], 10, 4.0);
    check_against_reference(&softmax_fast, &softmax_ref, &[s], &rand(&[2, 3, 13, 13], 11, 1.0), DType::F32, F32_TOL, "softmax f32");
}

#[test]
fn causal_softmax_long_rows_match_reference_f32() {
    // T = 300: rows longer than one CUDA block (256 threads, several warps per reduction), and
    // visible lengths from 1 to 300.
    let s = rand(&[1, 2, 300, 300], 16, 4.0);
    check_against_reference(&softmax_fast, &softmax_ref, &[s], &rand(&[1, 2, 300, 300], 17, 1.0), DType::F32, F32_TOL, "softmax f32 T=300");
}

#[test]
fn causal_softmax_forward_and_gradient_match_reference_bf16() {
    let s = rand(&[2, 3, 13, 13], 12, 4.0);
    check_against_reference(&softmax_fast, &softmax_ref, &[s], &rand(&[2, 3, 13, 13], 13, 1.0), DType::BF16, BF16_TOL, "softmax bf16");
}

#[test]
fn causal_softmax_forward_and_gradient_match_reference_f16() {
    let s = rand(&[3, 7, 7], 14, 4.0);
    check_against_reference(&softmax_fast, &softmax_ref, &[s], &rand(&[3, 7, 7], 15, 1.0), DType::F16, BF16_TOL, "softmax f16");
}

fn attention_inputs(seed: u64) -> (Vec<Tensor>, Tensor) {
    let shape = [2, 3, 13, 5];
    let inputs = vec![rand(&shape, seed, 2.0), rand(&shape, seed + 1, 2.0), rand(&shape, seed + 2, 1.0)];
    (inputs, rand(&shape, seed + 3, 1.0))
}

#[test]
fn causal_attention_forward_and_gradients_match_reference_f32() {
    let (inputs, g) = attention_inputs(20);
    check_against_reference(&attention_fast, &attention_ref, &inputs, &g, DType::F32, F32_TOL, "attention f32");
}

#[test]
fn causal_attention_forward_and_gradients_match_reference_bf16() {
    let (inputs, g) = attention_inputs(30);
    check_against_reference(&attention_fast, &attention_ref, &inputs, &g, DType::BF16, BF16_TOL, "attention bf16");
}

#[test]
fn causal_attention_forward_and_gradients_match_reference_f16() {
    let (inputs, g) = attention_inputs(35);
    check_against_reference(&attention_fast, &attention_ref, &inputs, &g, DType::F16, BF16_TOL, "attention f16");
}

#[test]
fn causal_attention_accepts_transposed_noncontiguous_inputs() {
    // q, k, v as produced by a model: (B, T, H, D) split into heads with a transpose.
    let make = |seed| rand(&[2, 13, 3, 5], seed, 1.5);
    let (q, k, v) = (make(40), make(41), make(42));
    let heads = |x: &Tensor| x.transpose(1, 2).unwrap();
    let y_ref = causal_attention_reference(&heads(&q).contiguous().unwrap(), &heads(&k).contiguous().unwrap(), &heads(&v).contiguous().unwrap()).unwrap();
    for dev in test_devices() {
        let (q, k, v) = (q.to_device(&dev).unwrap(), k.to_device(&dev).unwrap(), v.to_device(&dev).unwrap());
        let (q, k, v) = (heads(&q), heads(&k), heads(&v));
        assert!(!q.is_contiguous());
        let y = causal_attention(&q, &k, &v).unwrap();
        let on = format!("attention on transposed inputs on {:?}", dev.location());
        assert_close(&on_cpu(&y, &dev, &on), &y_ref, F32_TOL, &on);
    }
}

#[test]
fn causal_softmax_ignores_masked_scores_even_inf_and_nan() {
    let t = 6;
    let clean = rand(&[2, t, t], 50, 3.0);
    // Fill every future key (j > i) with garbage: inf, -inf, nan, huge values.
    let garbage = [f32::INFINITY, f32::NAN, f32::NEG_INFINITY, 1e30];
    let mut data = clean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (n, x) in data.iter_mut().enumerate() {
        let (i, j) = ((n / t) % t, n % t);
        if j > i {
            *x = garbage[n % garbage.len()];
        }
    }
    let dirty = Tensor::from_vec(data, (2, t, t), &Device::Cpu).unwrap();
    let g = rand(&[2, t, t], 51, 1.0);
    let mut cases = vec![("reference".to_string(), softmax_ref as fn(&[Tensor]) -> Result<Tensor>, Device::Cpu)];
    cases.extend(test_devices().into_iter().map(|dev| (format!("fast on {:?}", dev.location()), softmax_fast as fn(&[Tensor]) -> Result<Tensor>, dev)));
    for (name, op, dev) in cases {
        let run = |x: &Tensor| {
            let (p, grads) = forward_and_grads(&op, &[x.to_device(&dev).unwrap()], &g.to_device(&dev).unwrap());
            (on_cpu(&p, &dev, &name), on_cpu(&grads[0], &dev, &name))
        };
        let ((p_clean, grad_clean), (p_dirty, grad_dirty)) = (run(&clean), run(&dirty));
        let p = p_dirty.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dg = grad_dirty.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for n in 0..p.len() {
            let (i, j) = ((n / t) % t, n % t);
            if j > i {
                assert_eq!(p[n], 0.0, "{name}: P at query {i}, key {j} must be exactly 0");
                assert_eq!(dg[n], 0.0, "{name}: gradient at masked query {i}, key {j} must be 0");
            }
        }
        let row_sums = p_dirty.sum(2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(row_sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{name}: rows must sum to 1, got {row_sums:?}");
        assert_close(&p_dirty, &p_clean, F32_TOL, &format!("{name}: P with garbage in masked entries"));
        assert_close(&grad_dirty, &grad_clean, F32_TOL, &format!("{name}: gradient with garbage in masked entries"));
    }
}

#[test]
fn causal_attention_future_keys_and_values_do_not_change_earlier_outputs() {
    let (b, h, t, d, t0) = (2, 3, 13, 5, 7);
    let (inputs, _) = attention_inputs(60);
    // Replace k and v at positions t0.. with different values.
    let change = |x: &Tensor, seed| {
        let head = x.narrow(2, 0, t0).unwrap();
        Tensor::cat(&[&head, &rand(&[b, h, t - t0, d], seed, 3.0)], 2).unwrap()
    };
    let (k2, v2) = (change(&inputs[1], 61), change(&inputs[2], 62));
    let mut cases = vec![("reference".to_string(), causal_attention_reference as Op3, Device::Cpu)];
    cases.extend(test_devices().into_iter().map(|dev| (format!("fast on {:?}", dev.location()), causal_attention as Op3, dev)));
    for (name, op, dev) in cases {
        let d = |x: &Tensor| x.to_device(&dev).unwrap();
        let y1 = on_cpu(&op(&d(&inputs[0]), &d(&inputs[1]), &d(&inputs[2])).unwrap(), &dev, &name);
        let y2 = on_cpu(&op(&d(&inputs[0]), &d(&k2), &d(&v2)).unwrap(), &dev, &name);
        let past = |y: &Tensor| y.narrow(2, 0, t0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(past(&y1), past(&y2), "{name}: outputs before position {t0} changed");
        // Sanity: the outputs from t0 on do see the change, so the check above is not vacuous.
        let diff = (y1.narrow(2, t0, t - t0).unwrap() - y2.narrow(2, t0, t - t0).unwrap()).unwrap();
        let max = diff.abs().unwrap().max_keepdim(2).unwrap().min_keepdim(3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(max.iter().all(|&m| m > 1e-3), "{name}: outputs from position {t0} on should change, max diffs {max:?}");
    }
}

#[test]
fn causal_attention_rejects_mismatched_shapes() {
    for dev in test_devices() {
        let d = |x: Tensor| x.to_device(&dev).unwrap();
        let q = d(rand(&[1, 2, 4, 3], 70, 1.0));
        let k = d(rand(&[1, 2, 5, 3], 71, 1.0));
        let err = causal_attention(&q, &k, &q).unwrap_err().to_string();
        assert!(err.contains("causal_attention") && err.contains("[1, 2, 4, 3]") && err.contains("[1, 2, 5, 3]"), "{err}");
        let err = causal_softmax(&d(rand(&[2, 4, 5], 72, 1.0)), 1.0).unwrap_err().to_string();
        assert!(err.contains("causal_softmax") && err.contains("[2, 4, 5]"), "{err}");
    }
}

/// Rough speed of fwd+bwd at GPT-2-small-like sizes (run with `-- --ignored --nocapture`).
#[test]
#[ignore]
fn causal_attention_timing_fast_vs_reference_f32() {
    let shape = [12, 6, 256, 64];
    let inputs = vec![rand(&shape, 80, 1.0), rand(&shape, 81, 1.0), rand(&shape, 82, 1.0)];
    let g = rand(&shape, 83, 1.0);
    for (name, op) in [("fast", &attention_fast as &dyn Fn(&[Tensor]) -> Result<Tensor>), ("reference", &attention_ref)] {
        forward_and_grads(op, &inputs, &g); // warm-up
        let iters = 3;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grads(op, &inputs, &g);
        }
        println!("causal_attention {name} f32 fwd+bwd {shape:?}: {:.1} ms/iter", start.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
}
