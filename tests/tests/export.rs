//! The model folder as transformers' `GPT2LMHeadModel.from_pretrained` reads it, checked without
//! Python: an engine's parameters saved with `model_io` in f32 and bf16, then model.safetensors
//! re-read with the `safetensors` crate directly (every Hugging Face name and shape written out
//! here independently of models/src/gpt2.rs, no lm_head since it is tied, values exact in f32 and
//! rounded to nearest-even in bf16, metadata {"format": "pt"}) and config.json's GPT2Config keys;
//! then both folders read back through `load_model_folder`.

use std::collections::HashMap;
use std::path::Path;

use datasets::{CharTokenizer, Tokenizer};
use models::{Gpt2, Gpt2Config};
use safetensors::{Dtype, SafeTensors};
use tests::temp_dir;
use zero_candle::model_io::{self, ExportDtype};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions};

fn tiny_config() -> Gpt2Config {
    Gpt2Config { vocab_size: 13, context: 16, n_layer: 2, n_head: 2, n_embd: 8, layer_norm_eps: 1e-5 }
}

/// GPT2LMHeadModel's state-dict names and shapes (Conv1D weights are [in, out]), minus the tied
/// lm_head.weight.
fn hf_names(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let (v, p, c) = (cfg.vocab_size, cfg.context, cfg.n_embd);
    let mut out = vec![
        ("transformer.wte.weight".to_string(), vec![v, c]),
        ("transformer.wpe.weight".to_string(), vec![p, c]),
        ("transformer.ln_f.weight".to_string(), vec![c]),
        ("transformer.ln_f.bias".to_string(), vec![c]),
    ];
    for i in 0..cfg.n_layer {
        for (name, shape) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            out.push((format!("transformer.h.{i}.{name}"), shape));
        }
    }
    out
}

/// bfloat16 bits of `x`, rounded to nearest with ties to even (finite inputs), written here from
/// the bit layout rather than with the `half` crate the exporter uses.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The engine's initial parameters, with ln_f.bias replaced by values that exercise bf16
/// rounding (exact ties between two bfloat16 neighbours, a negative value, a tiny one).
fn parameters(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let engine = Engine::new(Gpt2::new(cfg.clone()).unwrap(), single_rank().unwrap(), 7, candle_core::Device::Cpu, EngineOptions::single()).unwrap();
    let mut params = engine.full_parameters().unwrap();
    let tie_down = 1.0 + 2f32.powi(-8); // halfway between 1 and 1 + 2^-7: ties to even -> 1.0
    let tie_up = 1.0 + 3.0 * 2f32.powi(-8); // halfway between 1 + 2^-7 and 1 + 2^-6: -> 1 + 2^-6
    let special = [tie_down, tie_up, -tie_up, 1e-30, -0.3333, 123.456, 0.0, -2.5];
    let bias = params.iter_mut().find(|p| p.0 == "transformer.ln_f.bias").unwrap();
    bias.2.copy_from_slice(&special[..cfg.n_embd]);
    assert_eq!(bf16_bits(tie_down), 0x3f80);
    assert_eq!(bf16_bits(tie_up), 0x3f82);
    params
}

fn save(dir: &Path, cfg: &Gpt2Config, params: &[(String, Vec<usize>, Vec<f32>)], dtype: ExportDtype) {
    let named: Vec<(&str, &[usize], &[f32])> = params.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text("abcdefghijklm").unwrap());
    assert_eq!(tokenizer.vocab_size(), cfg.vocab_size);
    model_io::save_model_folder_as(dir, &models::AnyConfig::Gpt2(cfg.clone()), 12, &named, &tokenizer, dtype).unwrap();
}

/// Checks model.safetensors and config.json of `dir` against `params` for `dtype`.
fn check_folder(dir: &Path, cfg: &Gpt2Config, params: &[(String, Vec<usize>, Vec<f32>)], dtype: ExportDtype) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let expected_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    assert_eq!(metadata.metadata().as_ref(), Some(&expected_meta));
    let st = SafeTensors::deserialize(&bytes).unwrap();

    let expected = hf_names(cfg);
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut want: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    want.sort_unstable();
    assert_eq!(names, want, "tensor names (no lm_head.weight: it is tied to wte)");

    let values: HashMap<&str, &[f32]> = params.iter().map(|(n, _, v)| (n.as_str(), v.as_slice())).collect();
    for (name, shape) in &expected {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.shape(), shape.as_slice(), "{name} shape");
        let source = values[name.as_str()];
        assert_eq!(source.len(), shape.iter().product::<usize>(), "{name} numel");
        match dtype {
            ExportDtype::F32 => {
                assert_eq!(view.dtype(), Dtype::F32, "{name}");
                let got: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                assert_eq!(got, source, "{name} values");
            }
            ExportDtype::Bf16 => {
                assert_eq!(view.dtype(), Dtype::BF16, "{name}");
                let got: Vec<u16> = view.data().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                let want: Vec<u16> = source.iter().map(|&x| bf16_bits(x)).collect();
                assert_eq!(got, want, "{name} bf16 bits");
                for (g, x) in got.iter().zip(source) {
                    let back = f32::from_bits((*g as u32) << 16);
                    assert!((back - x).abs() <= x.abs() * 2f32.powi(-8), "{name}: {x} -> {back}");
                }
            }
        }
    }

    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
    assert_eq!(config["n_embd"], cfg.n_embd);
    assert_eq!(config["n_layer"], cfg.n_layer);
    assert_eq!(config["n_head"], cfg.n_head);
    assert_eq!(config["n_positions"], cfg.context);
    assert_eq!(config["vocab_size"], cfg.vocab_size);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!(config["layer_norm_epsilon"], cfg.layer_norm_eps);
    assert_eq!(config["train_seq_len"], 12);
    // GPT2Config's default bos/eos (50256) would be outside this vocabulary of 13.
    assert!(config["bos_token_id"].is_null() && config["eos_token_id"].is_null(), "{config}");
    assert!(config.get("bos_token_id").is_some());
    let torch_dtype = match dtype {
        ExportDtype::F32 => "float32",
        ExportDtype::Bf16 => "bfloat16",
    };
    assert_eq!(config["torch_dtype"], torch_dtype);
    assert!(dir.join("vocab.json").is_file(), "the tokenizer is saved with the model");
}

#[test]
fn f32_model_folder_has_hugging_face_names_shapes_values_and_config() {
    let cfg = tiny_config();
    let params = parameters(&cfg);
    let dir = temp_dir("export-f32").join("model");
    save(&dir, &cfg, &params, ExportDtype::F32);
    check_folder(&dir, &cfg, &params, ExportDtype::F32);

    let loaded = model_io::load_model_folder(&dir).unwrap();
    assert_eq!(loaded.config, models::AnyConfig::Gpt2(cfg.clone()));
    assert_eq!(loaded.train_seq_len, 12);
    assert_eq!(loaded.params.len(), params.len());
    for (name, shape, values) in &params {
        assert_eq!(&loaded.params[name], &(shape.clone(), values.clone()), "{name} read back");
    }
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn bf16_model_folder_rounds_each_value_and_reads_back_as_f32() {
    let cfg = tiny_config();
    let params = parameters(&cfg);
    let dir = temp_dir("export-bf16").join("model");
    save(&dir, &cfg, &params, ExportDtype::Bf16);
    check_folder(&dir, &cfg, &params, ExportDtype::Bf16);

    let loaded = model_io::load_model_folder(&dir).unwrap();
    assert_eq!(loaded.config, models::AnyConfig::Gpt2(cfg.clone()));
    for (name, shape, values) in &params {
        let rounded: Vec<f32> = values.iter().map(|&x| f32::from_bits((bf16_bits(x) as u32) << 16)).collect();
        assert_eq!(&loaded.params[name], &(shape.clone(), rounded), "{name} read back");
    }
    // Overwriting a folder replaces it whole, whatever dtype it had.
    save(&dir, &cfg, &params, ExportDtype::F32);
    check_folder(&dir, &cfg, &params, ExportDtype::F32);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn export_dtype_parses_command_line_names() {
    assert_eq!("f32".parse::<ExportDtype>(), Ok(ExportDtype::F32));
    assert_eq!("bfloat16".parse::<ExportDtype>(), Ok(ExportDtype::Bf16));
    assert_eq!("BF16".parse::<ExportDtype>(), Ok(ExportDtype::Bf16));
    let err = "fp8".parse::<ExportDtype>().unwrap_err();
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
    assert_eq!(ExportDtype::default(), ExportDtype::F32);
    assert_eq!(ExportDtype::Bf16.to_string(), "bf16");
}
