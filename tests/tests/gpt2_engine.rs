//! The engine's block-by-block backward against a monolithic reference: a GPT-2 written here from
//! candle primitives and the kernels' `_reference` ops, differentiated in one `backward()`.
//! Checks the model wiring (names, layouts, tied head) and the per-block VJP plumbing at once.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var, D};
use kernels::testing::{assert_close, Tolerance};
use models::{BlockModel, Gpt2, Gpt2Config};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch};

fn tiny_config() -> Gpt2Config {
    Gpt2Config { vocab_size: 13, context: 9, n_layer: 2, n_head: 2, n_embd: 8, layer_norm_eps: 1e-5 }
}

fn batch(seed: u64, rows: usize, t: usize, vocab: u32) -> MicroBatch {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) % vocab as u64) as u32
    };
    let inputs: Vec<u32> = (0..rows * t).map(|_| next()).collect();
    let targets: Vec<u32> = (0..rows * t).map(|_| next()).collect();
    MicroBatch {
        inputs: Tensor::from_vec(inputs, (rows, t), &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(targets, (rows, t), &Device::Cpu).unwrap(),
    }
}

/// GPT-2 forward with reference ops, all in one graph; returns the mean loss.
fn reference_loss(cfg: &Gpt2Config, p: &HashMap<String, Var>, b: &MicroBatch) -> Tensor {
    let get = |n: &str| p.get(n).unwrap_or_else(|| panic!("missing {n}")).as_tensor().clone();
    let (bs, t) = b.inputs.dims2().unwrap();
    let c = cfg.n_embd;
    let (nh, hd) = (cfg.n_head, cfg.n_embd / cfg.n_head);
    let lin = |x: &Tensor, w: &str, bias: &str| -> Tensor {
        let n_out = get(w).dim(1).unwrap();
        x.reshape((bs * t, x.dim(2).unwrap())).unwrap().matmul(&get(w)).unwrap().broadcast_add(&get(bias)).unwrap().reshape((bs, t, n_out)).unwrap()
    };
    let ln = |x: &Tensor, pre: &str| kernels::layer_norm_reference(x, &get(&format!("{pre}.weight")), &get(&format!("{pre}.bias")), 1e-5).unwrap();
    let tok = get("transformer.wte.weight").index_select(&b.inputs.flatten_all().unwrap(), 0).unwrap().reshape((bs, t, c)).unwrap();
    let mut x = tok.broadcast_add(&get("transformer.wpe.weight").narrow(0, 0, t).unwrap()).unwrap();
    for i in 0..cfg.n_layer {
        let pre = format!("transformer.h.{i}");
        let qkv = lin(&ln(&x, &format!("{pre}.ln_1")), &format!("{pre}.attn.c_attn.weight"), &format!("{pre}.attn.c_attn.bias"));
        let head = |j: usize| qkv.narrow(D::Minus1, j * c, c).unwrap().reshape((bs, t, nh, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let y = kernels::causal_attention_reference(&head(0), &head(1), &head(2)).unwrap();
        let y = y.transpose(1, 2).unwrap().contiguous().unwrap().reshape((bs, t, c)).unwrap();
        x = (x + lin(&y, &format!("{pre}.attn.c_proj.weight"), &format!("{pre}.attn.c_proj.bias"))).unwrap();
        let h = lin(&ln(&x, &format!("{pre}.ln_2")), &format!("{pre}.mlp.c_fc.weight"), &format!("{pre}.mlp.c_fc.bias"));
        let h = kernels::gelu_reference(&h).unwrap();
        x = (x + lin(&h, &format!("{pre}.mlp.c_proj.weight"), &format!("{pre}.mlp.c_proj.bias"))).unwrap();
    }
    let x = ln(&x, "transformer.ln_f");
    let logits = x.reshape((bs * t, c)).unwrap().matmul(&get("transformer.wte.weight").t().unwrap()).unwrap();
    kernels::cross_entropy_reference(&logits.reshape((bs, t, cfg.vocab_size)).unwrap(), &b.targets, None).unwrap()
}

#[test]
fn engine_block_by_block_gradients_match_monolithic_reference() {
    let cfg = tiny_config();
    let mut engine = Engine::new(Gpt2::new(cfg.clone()).unwrap(), single_rank().unwrap(), 7, Device::Cpu, EngineOptions::single()).unwrap();
    let b = batch(3, 3, 7, cfg.vocab_size as u32);
    let stats = engine.compute_gradients(std::slice::from_ref(&b)).unwrap();

    let vars: HashMap<String, Var> = engine
        .full_parameters()
        .unwrap()
        .into_iter()
        .map(|(n, shape, v)| (n, Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()))
        .collect();
    let loss = reference_loss(&cfg, &vars, &b);
    let ref_loss = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((stats.loss - ref_loss).abs() < 1e-5 * ref_loss.abs(), "loss {} vs reference {ref_loss}", stats.loss);
    let grads = loss.backward().unwrap();
    let tol = Tolerance { rtol: 1e-3, atol: 1e-6 };
    assert_eq!(vars.len(), 4 + 12 * cfg.n_layer);
    for (name, var) in &vars {
        let expected = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("reference has no gradient for {name}"));
        let got = Tensor::from_vec(engine.gradient(name).unwrap().1, expected.shape(), &Device::Cpu).unwrap();
        assert!(expected.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
        assert_close(&got, expected, tol, name);
    }
}

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let cfg = tiny_config();
    let full = batch(11, 4, 6, cfg.vocab_size as u32);
    let halves: Vec<MicroBatch> = (0..2)
        .map(|i| MicroBatch { inputs: full.inputs.narrow(0, 2 * i, 2).unwrap(), targets: full.targets.narrow(0, 2 * i, 2).unwrap() })
        .collect();
    let mut one = Engine::new(Gpt2::new(cfg.clone()).unwrap(), single_rank().unwrap(), 5, Device::Cpu, EngineOptions::single()).unwrap();
    let mut two = Engine::new(Gpt2::new(cfg).unwrap(), single_rank().unwrap(), 5, Device::Cpu, EngineOptions::single()).unwrap();
    let hyper = kernels::AdamWHyper { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    for _ in 0..3 {
        let a = one.train_step(std::slice::from_ref(&full), 1e-2, &hyper, 1.0).unwrap();
        let b = two.train_step(&halves, 1e-2, &hyper, 1.0).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-5, "loss {} vs accumulated {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "grad norm {} vs {}", a.grad_norm, b.grad_norm);
    }
    for ((n, shape, x), (_, _, y)) in one.full_parameters().unwrap().into_iter().zip(two.full_parameters().unwrap()) {
        let x = Tensor::from_vec(x, shape.as_slice(), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, shape.as_slice(), &Device::Cpu).unwrap();
        assert_close(&y, &x, Tolerance { rtol: 1e-4, atol: 1e-5 }, &n);
    }
}

#[test]
fn gpt2_parameter_names_and_shapes_are_hugging_faces() {
    let cfg = Gpt2Config { vocab_size: 50257, context: 1024, n_layer: 12, n_head: 12, n_embd: 768, layer_norm_eps: 1e-5 };
    let model = Gpt2::new(cfg.clone()).unwrap();
    let units = model.units();
    let params: Vec<(String, Vec<usize>)> = units.iter().flat_map(|u| u.params.iter().map(|p| (p.name.clone(), p.shape.clone()))).collect();
    let find = |n: &str| params.iter().find(|p| p.0 == n).unwrap_or_else(|| panic!("no parameter {n}")).1.clone();
    assert_eq!(find("transformer.wte.weight"), vec![50257, 768]);
    assert_eq!(find("transformer.wpe.weight"), vec![1024, 768]);
    assert_eq!(find("transformer.h.0.attn.c_attn.weight"), vec![768, 2304]); // Conv1D: [in, out]
    assert_eq!(find("transformer.h.11.mlp.c_proj.weight"), vec![3072, 768]);
    assert_eq!(find("transformer.ln_f.bias"), vec![768]);
    assert_eq!(params.len(), 4 + 12 * 12);
    // GPT2LMHeadModel's parameter count (lm_head tied to wte).
    let total: usize = units.iter().map(|u| u.numel()).sum();
    assert_eq!(total, 124_439_808);
    assert_eq!(cfg.num_params(), total);
    assert_eq!(units.len(), 13);
}
