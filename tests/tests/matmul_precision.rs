//! bf16 matrix products (`MatmulPrecision::Bf16`, AMX) and the explicit GPT-2 block backward.
//!
//! 1. The explicit block backward (`block_forward_train` + `block_backward`) equals candle's
//!    autograd through `block`, in both matmul precisions.
//! 2. A GPT-2 trained with bf16 products follows the f32 one: gradients within bf16 tolerance and
//!    losses after a few AdamW steps within 1%.
//!
//! The precision is process-wide, so this file is its own test binary and its tests run in one
//! function, in order.

use candle_core::{Device, Tensor, Var};
use kernels::testing::{assert_close, uniform_values, Tolerance};
use kernels::{set_matmul_precision, MatmulPrecision};
use models::{BlockModel, Gpt2, Gpt2Config};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch};

fn config() -> Gpt2Config {
    // Wide enough for several AMX tiles per product (C = 64, 4C = 256, T = 40 > 32).
    Gpt2Config { vocab_size: 37, context: 48, n_layer: 2, n_head: 4, n_embd: 64, layer_norm_eps: 1e-5 }
}

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = uniform_values(n, seed).into_iter().map(|u| scale * u as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn explicit_backward_matches_autograd(precision: MatmulPrecision) {
    let cfg = config();
    let model = Gpt2::new(cfg.clone()).unwrap();
    let specs = &model.units()[1].params;
    let params: Vec<Var> = specs.iter().enumerate().map(|(i, s)| Var::from_tensor(&random(&s.shape, 100 + i as u64, 0.3)).unwrap()).collect();
    let x = Var::from_tensor(&random(&[2, 40, cfg.n_embd], 1, 1.0)).unwrap();
    let upstream = random(&[2, 40, cfg.n_embd], 2, 1.0);

    let tensors: Vec<Tensor> = params.iter().map(|v| v.as_tensor().clone()).collect();
    let y = model.block(0, &tensors, &vec![x.as_tensor().clone()]).unwrap();
    let grads = (&y[0] * &upstream).unwrap().sum_all().unwrap().backward().unwrap();

    let detached: Vec<Tensor> = params.iter().map(|v| v.as_detached_tensor()).collect();
    let (y2, tape) = model.block_forward_train(0, &detached, &vec![x.as_detached_tensor()]).unwrap();
    let (dx, dparams) = model.block_backward(0, &detached, tape, &vec![upstream]).unwrap();

    let tol = Tolerance { rtol: 1e-4, atol: 1e-5 };
    assert_close(&y2[0], &y[0], tol, &format!("{precision:?} block output"));
    assert_close(&dx[0], grads.get(x.as_tensor()).unwrap(), tol, &format!("{precision:?} dx"));
    for ((spec, var), got) in specs.iter().zip(&params).zip(&dparams) {
        assert_close(got, grads.get(var.as_tensor()).unwrap(), tol, &format!("{precision:?} d {}", spec.name));
    }
}

fn batch(seed: u64) -> MicroBatch {
    let ids = |s: u64| {
        let v: Vec<u32> = uniform_values(3 * 40, s).into_iter().map(|u| ((u + 1.0) * 18.4) as u32 % 37).collect();
        Tensor::from_vec(v, (3, 40), &Device::Cpu).unwrap()
    };
    MicroBatch { inputs: ids(seed), targets: ids(seed + 1) }
}

fn bf16_training_follows_f32() {
    let cfg = config();
    let hyper = kernels::AdamWHyper { lr: 3e-3, weight_decay: 0.1, ..Default::default() };
    let run = |precision: MatmulPrecision| {
        set_matmul_precision(precision);
        let mut engine = Engine::new(Gpt2::new(cfg.clone()).unwrap(), single_rank().unwrap(), 11, Device::Cpu, EngineOptions::single()).unwrap();
        let first = engine.compute_gradients(std::slice::from_ref(&batch(5))).unwrap();
        let grads: Vec<(String, Vec<f32>)> = engine.full_parameters().unwrap().into_iter().map(|(n, _, _)| (n.clone(), engine.gradient(&n).unwrap().1)).collect();
        let mut losses = vec![first.loss];
        for step in 0..6 {
            losses.push(engine.train_step(std::slice::from_ref(&batch(10 + step)), 3e-3, &hyper, 1.0).unwrap().loss);
        }
        (grads, losses)
    };
    let (g32, l32) = run(MatmulPrecision::F32);
    let (g16, l16) = run(MatmulPrecision::Bf16);
    set_matmul_precision(MatmulPrecision::F32);
    let amx = kernels::gemm::amx_available();
    for ((name, a), (_, b)) in g16.iter().zip(&g32) {
        let (a, b) = (Tensor::new(a.as_slice(), &Device::Cpu).unwrap(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap());
        // Gradients through bf16 products: a few % of their own scale.
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_close(&a, &b, Tolerance { rtol: 5e-2, atol: 5e-2 * scale }, &format!("bf16 matmul gradient {name}"));
    }
    for (i, (a, b)) in l16.iter().zip(&l32).enumerate() {
        assert!((a - b).abs() <= 1e-2 * b.abs(), "step {i}: loss {a} with bf16 products vs {b} in f32");
    }
    if amx {
        assert_ne!(l16, l32, "bf16 products gave bit-identical losses: the AMX path did not run");
    }
}

#[test]
fn bf16_matmul_and_explicit_backward() {
    explicit_backward_matches_autograd(MatmulPrecision::F32);
    set_matmul_precision(MatmulPrecision::Bf16);
    explicit_backward_matches_autograd(MatmulPrecision::Bf16);
    bf16_training_follows_f32();
}
