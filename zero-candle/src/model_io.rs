//! The model folder written at the end of training and read by `zero-candle sample` and `eval`:
//! `model.safetensors` (f32 or bf16, Hugging Face GPT-2 names and layouts, metadata
//! {"format": "pt"}), `config.json` (Hugging Face GPT2Config keys, `torch_dtype` saying which)
//! and the tokenizer file. Written into a temporary folder and renamed, so an interrupted save
//! never leaves a half-written model under the name. Reading accepts F32, BF16 and F16 tensors
//! and converts them to f32. (Sharded training checkpoints are a separate format: see
//! docs/ARCHITECTURE.md.)

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use datasets::{Tokenizer, TokenizerKind};
use models::{AnyConfig, Gpt2Config, LlamaConfig};
use safetensors::{Dtype, SafeTensors};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const WEIGHTS_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.json";
/// GPT-2's <|endoftext|> id, GPT2Config's default bos_token_id and eos_token_id.
const GPT2_END_OF_TEXT: usize = 50256;

/// The dtype of the tensors in a saved model.safetensors. Training state is f32; `Bf16` rounds
/// each value to the nearest bfloat16 (ties to even), halving the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportDtype {
    #[default]
    F32,
    Bf16,
}

impl ExportDtype {
    /// The name used on the command line and in errors: "f32" or "bf16".
    pub fn as_str(self) -> &'static str {
        match self {
            ExportDtype::F32 => "f32",
            ExportDtype::Bf16 => "bf16",
        }
    }

    /// The `torch_dtype` written to config.json.
    pub fn torch_dtype(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
        }
    }

    fn safetensors_dtype(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::Bf16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this dtype.
    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

impl fmt::Display for ExportDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportDtype {
    type Err = String;

    /// "f32" / "float32" or "bf16" / "bfloat16" (so `--dtype` can be a clap argument).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(ExportDtype::F32),
            "bf16" | "bfloat16" => Ok(ExportDtype::Bf16),
            _ => Err(format!("unknown model dtype {s:?}; use f32 or bf16")),
        }
    }
}

/// The Hugging Face `config.json` of a GPT-2, plus `train_seq_len`: the window the model was
/// trained on (positions beyond it are untrained, so sampling keeps its input within it;
/// transformers keeps unknown keys as plain attributes).
fn hf_config_json(cfg: &AnyConfig, train_seq_len: usize, dtype: ExportDtype) -> serde_json::Value {
    let cfg = match cfg {
        AnyConfig::Gpt2(c) => c,
        AnyConfig::Llama(c) => return llama_config_json(c, train_seq_len, dtype),
    };
    let mut config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context,
        "n_ctx": cfg.context,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": true,
        "torch_dtype": dtype.torch_dtype(),
        "train_seq_len": train_seq_len,
    });
    // GPT2Config defaults bos/eos to GPT-2's <|endoftext|> (50256); a smaller vocabulary (a
    // character one) has no such token, so say there is none rather than name an invalid id.
    if cfg.vocab_size <= GPT2_END_OF_TEXT {
        config["bos_token_id"] = serde_json::Value::Null;
        config["eos_token_id"] = serde_json::Value::Null;
    }
    config
}

/// The Hugging Face `config.json` of a Llama (LlamaConfig keys), plus `train_seq_len`.
fn llama_config_json(c: &LlamaConfig, train_seq_len: usize, dtype: ExportDtype) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": dtype.torch_dtype(),
        "train_seq_len": train_seq_len,
    })
}

/// Write `params` (name, shape, f32 values), the config and the tokenizer to `dir`, in f32.
pub fn save_model_folder(
    dir: &Path,
    cfg: &AnyConfig,
    train_seq_len: usize,
    params: &[(&str, &[usize], &[f32])], tokenizer: &Tokenizer) -> Result<(), BoxError> {
    save_model_folder_as(dir, cfg, train_seq_len, params, tokenizer, ExportDtype::F32)
}

/// Write `params` (name, shape, f32 values) converted to `dtype`, the config (its `torch_dtype`
/// naming `dtype`) and the tokenizer to `dir`.
pub fn save_model_folder_as(
    dir: &Path,
    cfg: &AnyConfig,
    train_seq_len: usize,
    params: &[(&str, &[usize], &[f32])],
    tokenizer: &Tokenizer,
    dtype: ExportDtype,
) -> Result<(), BoxError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let name = dir.file_name().ok_or_else(|| format!("{} is not a folder name", dir.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| format!("cannot clear {}: {e}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;

    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(n, shape, values)| (n.to_string(), shape.to_vec(), dtype.encode(values)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(dtype.safetensors_dtype(), shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("cannot save parameter {n} (shape {shape:?}, {} bytes as {dtype}): {e}", b.len()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &tmp.join(WEIGHTS_FILE))
        .map_err(|e| format!("cannot write {}: {e}", tmp.join(WEIGHTS_FILE).display()))?;
    let config = serde_json::to_string_pretty(&hf_config_json(cfg, train_seq_len, dtype))?;
    std::fs::write(tmp.join(CONFIG_FILE), config).map_err(|e| format!("cannot write {}: {e}", tmp.join(CONFIG_FILE).display()))?;
    tokenizer.save(&tmp)?;

    // Replace the previous folder only once the new one is complete.
    if dir.exists() {
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| format!("cannot move the previous {} aside: {e}", dir.display()))?;
        std::fs::rename(&tmp, dir).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dir.display()))?;
        std::fs::remove_dir_all(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dir.display()))?;
    }
    Ok(())
}

/// A model folder read back: config, parameters by name (f32) and tokenizer.
pub struct LoadedModel {
    pub config: AnyConfig,
    /// Longest input the model was trained on (the model's context when not recorded).
    pub train_seq_len: usize,
    pub params: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub tokenizer: Tokenizer,
}

fn json_usize(v: &serde_json::Value, key: &str, file: &Path) -> Result<usize, BoxError> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| format!("{}: missing or invalid integer key {key:?}", file.display()).into())
}

/// The model config of a Hugging Face config.json (GPT2Config or LlamaConfig keys).
pub fn parse_hf_config(v: &serde_json::Value, file: &Path) -> Result<AnyConfig, BoxError> {
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("gpt2") => Ok(AnyConfig::Gpt2(Gpt2Config {
            vocab_size: json_usize(v, "vocab_size", file)?,
            context: json_usize(v, "n_positions", file)?,
            n_layer: json_usize(v, "n_layer", file)?,
            n_head: json_usize(v, "n_head", file)?,
            n_embd: json_usize(v, "n_embd", file)?,
            layer_norm_eps: v.get("layer_norm_epsilon").and_then(|x| x.as_f64()).unwrap_or(1e-5),
        })),
        Some("llama") => {
            let heads = json_usize(v, "num_attention_heads", file)?;
            if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
                if act != "silu" {
                    return Err(format!("{}: hidden_act {act:?} is not supported (Llama uses \"silu\")", file.display()).into());
                }
            }
            let has = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
            if has("attention_bias") || has("mlp_bias") {
                return Err(format!("{}: attention_bias/mlp_bias are not supported", file.display()).into());
            }
            if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
                return Err(format!("{}: rope_scaling is not supported yet", file.display()).into());
            }
            // transformers >= 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": ...}}
            // instead of a top-level rope_theta.
            let rope_parameters = v.get("rope_parameters").filter(|r| !r.is_null());
            if let Some(kind) = rope_parameters.and_then(|r| r.get("rope_type")).and_then(|t| t.as_str()) {
                if kind != "default" {
                    return Err(format!("{}: rope_parameters.rope_type {kind:?} is not supported yet (only \"default\")", file.display()).into());
                }
            }
            let rope_theta = v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .or_else(|| rope_parameters.and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()))
                .unwrap_or(10000.0);
            Ok(AnyConfig::Llama(LlamaConfig {
                vocab_size: json_usize(v, "vocab_size", file)?,
                hidden_size: json_usize(v, "hidden_size", file)?,
                intermediate_size: json_usize(v, "intermediate_size", file)?,
                num_hidden_layers: json_usize(v, "num_hidden_layers", file)?,
                num_attention_heads: heads,
                num_key_value_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).map_or(heads, |x| x as usize),
                rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
                rope_theta,
                max_position_embeddings: json_usize(v, "max_position_embeddings", file)?,
                tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            }))
        }
        other => Err(format!("{}: model_type {other:?} is not supported (\"gpt2\" or \"llama\")", file.display()).into()),
    }
}

/// The weight files of a folder: model.safetensors, or the shards listed in
/// model.safetensors.index.json (model-0000x-of-0000y.safetensors).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, BoxError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .map_err(|_| format!("{}: neither {WEIGHTS_FILE} nor model.safetensors.index.json is there", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", index.display()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| format!("{}: no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Read every tensor of `path` as f32.
fn read_tensors(path: &Path, params: &mut HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<(), BoxError> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: not a valid safetensors file: {e}", path.display()))?;
    for (name, view) in st.tensors() {
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => view.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => view.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(format!("{}: tensor {name} is {other:?}; expected F32, BF16 or F16", path.display()).into()),
        };
        params.insert(name, (view.shape().to_vec(), values));
    }
    Ok(())
}

/// Where a `--model` argument points: an existing folder as is, or a Hugging Face hub id
/// (`org/name`) resolved through the hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`): `models--org--name/snapshots/<refs/main>`. A model missing from the
/// cache is downloaded with the hf-hub crate (config.json, model.safetensors or the index and its
/// shards, tokenizer.json; `HF_ENDPOINT` respected) unless `HF_HUB_OFFLINE=1`, in which case the
/// error names where it looked.
pub fn resolve_model_path(arg: &Path) -> Result<PathBuf, BoxError> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let parts: Vec<&str> = text.split('/').collect();
    let is_hub_id = parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'));
    if !is_hub_id {
        return Err(format!("model folder {} does not exist", arg.display()).into());
    }
    let cache = match (std::env::var_os("HF_HUB_CACHE"), std::env::var_os("HF_HOME"), std::env::var_os("HOME")) {
        (Some(c), _, _) => PathBuf::from(c),
        (None, Some(h), _) => PathBuf::from(h).join("hub"),
        (None, None, Some(home)) => PathBuf::from(home).join(".cache/huggingface/hub"),
        _ => return Err(format!("{text}: neither a folder nor resolvable: set HF_HOME or HF_HUB_CACHE").into()),
    };
    let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
    let main_ref = repo.join("refs").join("main");
    let snapshot = std::fs::read_to_string(&main_ref).ok().map(|h| repo.join("snapshots").join(h.trim())).filter(|d| d.join(CONFIG_FILE).is_file());
    if let Some(dir) = snapshot {
        return Ok(dir);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if offline {
        return Err(format!(
            "{text} is not a folder and not in the Hugging Face cache (looked for {} and its snapshot's {CONFIG_FILE}); \
             HF_HUB_OFFLINE=1 forbids downloading it: unset it, or fetch it with `huggingface-cli download {text}`",
            main_ref.display()
        )
        .into());
    }
    download(&text, cache)
}

/// Download a model's files into the hub cache with the hf-hub crate; returns the snapshot folder.
fn download(id: &str, cache: PathBuf) -> Result<PathBuf, BoxError> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache)).with_progress(false);
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    builder = builder.with_endpoint(endpoint.clone());
    let fail = |what: &str, e: &dyn std::fmt::Display| -> BoxError {
        format!("cannot download {what} of {id} from {endpoint}: {e}; check the network, or download it beforehand and set HF_HUB_OFFLINE=1").into()
    };
    let api = builder.build().map_err(|e| fail("anything", &e))?;
    let repo = api.model(id.to_string());
    let config = repo.get(CONFIG_FILE).map_err(|e| fail(CONFIG_FILE, &e))?;
    let dir = config.parent().map(Path::to_path_buf).ok_or_else(|| format!("{}: no parent folder", config.display()))?;
    if repo.get(WEIGHTS_FILE).is_err() {
        let index = repo.get("model.safetensors.index.json").map_err(|e| fail("model.safetensors or model.safetensors.index.json", &e))?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?).map_err(|e| format!("{}: invalid JSON: {e}", index.display()))?;
        let mut shards: Vec<String> = v.get("weight_map").and_then(|m| m.as_object()).map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect()).unwrap_or_default();
        shards.sort();
        shards.dedup();
        for shard in shards {
            repo.get(&shard).map_err(|e| fail(&shard, &e))?;
        }
    }
    // Tokenizer files are optional here: loading says clearly if tokenizer.json is missing.
    let _ = repo.get("tokenizer.json");
    let _ = repo.get("tokenizer_config.json");
    Ok(dir)
}

/// Load a model folder: ours (`train`/`export`) or a Hugging Face GPT-2 / Llama folder
/// (config.json, model.safetensors or sharded with an index, tokenizer.json).
pub fn load_model_folder(dir: &Path) -> Result<LoadedModel, BoxError> {
    let dir = &resolve_model_path(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("cannot read {} ({e}); expected a model folder (config.json, model.safetensors, tokenizer)", config_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", config_path.display()))?;
    let config = parse_hf_config(&v, &config_path)?;
    let train_seq_len = v.get("train_seq_len").and_then(|x| x.as_u64()).map_or(config.context(), |x| x as usize);
    let mut params = HashMap::new();
    for file in weight_files(dir)? {
        read_tensors(&file, &mut params)?;
    }
    let kind = if dir.join(TokenizerKind::HuggingFace.file_name()).is_file() { TokenizerKind::HuggingFace } else { TokenizerKind::Char };
    let tokenizer = Tokenizer::load(dir, kind)?;
    Ok(LoadedModel { config, train_seq_len, params, tokenizer })
}

/// The default model folder of a run.
pub fn model_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("model")
}
