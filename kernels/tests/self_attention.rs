//! Tests for `kernels::causal_self_attention` (qkv (B, T, 3C) -> (B, T, C)): forward and dqkv
//! against the reference (head split + `causal_attention` + merge, itself checked against plain
//! candle ops) in exact f32, and within the bf16 bound with bf16 matmul precision on AMX CPUs.
//! The precision switch is process-wide, so one test runs both in order.

use candle_core::{DType, Device, Tensor, Var};
use kernels::testing::{assert_close, Tolerance, F32_TOL};
use kernels::{causal_self_attention, causal_self_attention_reference, set_matmul_precision, MatmulPrecision};

fn pseudo_random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| scale * u as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn run(f: &dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor>, qkv: &Tensor, heads: usize, g: &Tensor) -> [Tensor; 2] {
    let v = Var::from_tensor(qkv).unwrap();
    let y = f(v.as_tensor(), heads).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    [y, grads.get(&v).unwrap().clone()]
}

#[test]
fn self_attention_matches_reference() {
    // (B, T, heads, head size): odd sizes, one token, more tokens than a tile.
    let cases = [(2, 5, 2, 3), (1, 1, 1, 4), (1, 33, 4, 16), (2, 70, 3, 32)];
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        set_matmul_precision(precision);
        let bf16 = precision == MatmulPrecision::Bf16 && kernels::gemm::amx_available();
        for (i, &(b, t, h, d)) in cases.iter().enumerate() {
            let c = h * d;
            // Scale 2: scores spread enough that the softmax is far from uniform.
            let qkv = pseudo_random(&[b, t, 3 * c], 7 * i as u64, 2.0);
            let g = pseudo_random(&[b, t, c], 7 * i as u64 + 1, 1.0);
            let fast = run(&causal_self_attention, &qkv, h, &g);
            let reference = run(&causal_self_attention_reference, &qkv, h, &g);
            let tol = if bf16 { Tolerance { rtol: 3e-2, atol: 3e-2 } } else { F32_TOL };
            for (name, (a, e)) in ["y", "dqkv"].iter().zip(fast.iter().zip(&reference)) {
                assert_eq!(a.dims(), e.dims());
                assert_close(a, e, tol, &format!("{precision:?} {name} B{b} T{t} H{h} D{d}"));
            }
        }
    }
    set_matmul_precision(MatmulPrecision::F32);
}

#[test]
fn self_attention_other_dtypes_use_the_reference() {
    let qkv = pseudo_random(&[1, 6, 12], 3, 1.0).to_dtype(DType::BF16).unwrap();
    let y = causal_self_attention(&qkv, 2).unwrap();
    let e = causal_self_attention_reference(&qkv, 2).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    assert_close(&y, &e, Tolerance { rtol: 0.0, atol: 0.0 }, "bf16 tensors");
}

#[test]
fn self_attention_rejects_bad_widths() {
    let qkv = pseudo_random(&[1, 4, 10], 1, 1.0);
    assert!(causal_self_attention(&qkv, 2).is_err());
}

#[test]
fn second_backward_recomputes_the_probabilities() {
    // The forward's P is handed to the first backward; a second backward over the same graph
    // recomputes it and must give the same gradient.
    let qkv = pseudo_random(&[2, 37, 3 * 2 * 8], 11, 2.0);
    let g = pseudo_random(&[2, 37, 16], 12, 1.0);
    let v = Var::from_tensor(&qkv).unwrap();
    let loss = causal_self_attention(v.as_tensor(), 2).unwrap().mul(&g).unwrap().sum_all().unwrap();
    let first = loss.backward().unwrap().get(&v).unwrap().clone();
    let second = loss.backward().unwrap().get(&v).unwrap().clone();
    assert_close(&second, &first, Tolerance { rtol: 0.0, atol: 0.0 }, "recomputed P");
}
