//! Helpers shared by the fine-tuning tests: a tiny Llama (SmolLM2's 49152-token tokenizer,
//! 2 blocks of width 32) written as a Hugging Face model folder.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use models::{AnyConfig, Llama, LlamaConfig};
use zero_candle::train::single_rank;
use zero_candle::{model_io, Engine, EngineOptions};

pub type Params = Vec<(String, Vec<usize>, Vec<f32>)>;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// SmolLM2's tokenizer.json from ../shared (the test fails naming it when missing).
pub fn tokenizer_path() -> PathBuf {
    let path = root().join("../shared/models/smollm2-135m-instruct/tokenizer.json");
    assert!(path.is_file(), "missing {}", path.display());
    path
}

pub fn tiny_llama_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
    }
}

/// The tiny Llama's initial parameters (seed 1).
pub fn tiny_llama_params() -> Params {
    let engine = Engine::new(Llama::new(tiny_llama_config()).unwrap(), single_rank().unwrap(), 1, Device::Cpu, EngineOptions::single()).unwrap();
    engine.full_parameters().unwrap()
}

pub fn by_name(params: &Params) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    params.iter().map(|(n, s, v)| (n.clone(), (s.clone(), v.clone()))).collect()
}

/// Write the tiny Llama as a model folder (config.json, model.safetensors, tokenizer.json).
pub fn tiny_llama_folder(dir: &Path) {
    let tokenizer = datasets::Tokenizer::from_huggingface_file(&tokenizer_path()).unwrap();
    let params = tiny_llama_params();
    let named: Vec<(&str, &[usize], &[f32])> = params.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    model_io::save_model_folder(dir, &AnyConfig::Llama(tiny_llama_config()), 64, &named, &tokenizer).unwrap();
}
