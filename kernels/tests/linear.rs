//! Tests for `kernels::linear`: with f32 matmul precision it is the candle reference; with bf16
//! precision on an AMX CPU, forward, dx, dW and db match the f32 reference computed on the same
//! bf16-rounded inputs to f32 accuracy, and the unrounded f32 reference within the bf16 bound.
//!
//! The precision is a process-wide switch, so everything runs in one test, in order.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{assert_close, Tolerance, F32_TOL};
use kernels::{linear, linear_reference, set_matmul_precision, MatmulPrecision, WeightLayout};

fn pseudo_random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| u as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Round to bf16 and back (what the AMX path does to its inputs).
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

type LinearFn = dyn Fn(&Tensor, &Tensor, Option<&Tensor>, WeightLayout) -> Result<Tensor>;

/// y, dx, dW, db of sum(linear(x, w, b) * g).
fn run(f: &LinearFn, x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: &Tensor, layout: WeightLayout) -> Vec<Tensor> {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let bv = b.map(|b| Var::from_tensor(b).unwrap());
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_ref().map(|v| v.as_tensor()), layout).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y, grads.get(&xv).unwrap().clone(), grads.get(&wv).unwrap().clone()];
    if let Some(bv) = bv {
        out.push(grads.get(&bv).unwrap().clone());
    }
    out
}

const CASES: [(&[usize], usize); 4] = [(&[5, 7, 33], 19), (&[64, 96], 160), (&[1, 1, 8], 1), (&[3, 300], 47)];

#[test]
fn linear_matches_reference_in_both_precisions() {
    let layouts = [WeightLayout::OutIn, WeightLayout::InOut];
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        set_matmul_precision(precision);
        let amx = kernels::gemm::amx_available();
        for (i, (x_dims, n_out)) in CASES.iter().enumerate() {
            let n_in = *x_dims.last().unwrap();
            let mut y_dims = x_dims.to_vec();
            *y_dims.last_mut().unwrap() = *n_out;
            for layout in layouts {
                let w_dims = match layout {
                    WeightLayout::OutIn => [*n_out, n_in],
                    WeightLayout::InOut => [n_in, *n_out],
                };
                let seed = 100 * i as u64;
                let (x, w, b, g) = (pseudo_random(x_dims, seed), pseudo_random(&w_dims, seed + 1), pseudo_random(&[*n_out], seed + 2), pseudo_random(&y_dims, seed + 3));
                for bias in [None, Some(&b)] {
                    let what = format!("{precision:?} {layout:?} x {x_dims:?} out {n_out} bias {}", bias.is_some());
                    let fast = run(&linear, &x, &w, bias, &g, layout);
                    if precision == MatmulPrecision::F32 || !amx {
                        // Exact f32 products (ours with AVX-512, else candle's): equal up to
                        // summation order.
                        let reference = run(&linear_reference, &x, &w, bias, &g, layout);
                        for (a, e) in fast.iter().zip(&reference) {
                            assert_close(a, e, F32_TOL, &what);
                        }
                        continue;
                    }
                    // bf16 products: exact up to f32 summation order on rounded inputs...
                    let rounded = run(&linear_reference, &bf16_rounded(&x), &bf16_rounded(&w), bias, &bf16_rounded(&g), layout);
                    // (db is a plain f32 sum of the unrounded g: checked against the exact result.)
                    for (name, (a, e)) in ["y", "dx", "dw"].iter().zip(fast.iter().zip(&rounded)) {
                        assert_close(a, e, F32_TOL, &format!("{what} {name} vs rounded inputs"));
                    }
                    // ...and within bf16 input rounding of the exact f32 result (k up to 300 here).
                    let exact = run(&linear_reference, &x, &w, bias, &g, layout);
                    let diff = (&fast[0] - &exact[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff > 0.0, "{what}: bf16 precision gave exactly the f32 result (AMX path not taken?)");
                    for (name, (a, e)) in ["y", "dx", "dw", "db"].iter().zip(fast.iter().zip(&exact)) {
                        let tol = if *name == "db" { F32_TOL } else { Tolerance { rtol: 2e-2, atol: 5e-2 } };
                        assert_close(a, e, tol, &format!("{what} {name} vs f32"));
                    }
                }
            }
        }
    }
    set_matmul_precision(MatmulPrecision::F32);
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let x = pseudo_random(&[4, 8], 1);
    let w = pseudo_random(&[3, 7], 2);
    // Either path must fail with a shape error, never read out of bounds.
    assert!(linear(&x, &w, None, WeightLayout::OutIn).is_err());
    assert!(linear_reference(&x, &w, None, WeightLayout::OutIn).is_err());
}
