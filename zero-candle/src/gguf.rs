//! `zero-candle convert-gguf`: a llama-architecture GGUF file (llama.cpp's format, any of the
//! quantizations candle reads) to a Hugging Face `LlamaForCausalLM` folder: `config.json`
//! (transformers' LlamaConfig keys), `model.safetensors` (f32 or bf16, metadata
//! {"format": "pt"}) and the `tokenizer.json` / `tokenizer_config.json` found beside the GGUF.
//!
//! Reading: candle's `gguf_file::Content::read` parses the header; every tensor is read and
//! dequantized to f32 on the CPU (`QTensor::dequantize`). ggml lists a tensor's dimensions
//! innermost first (`token_embd.weight` is stored as [hidden, vocab]); candle reverses them when
//! it reads the header, so `QTensor::shape()` is already PyTorch's row-major [out, in] and the
//! dequantized values are in PyTorch order: no transpose is needed, only the checks below that
//! every shape is what the config implies.
//!
//! Metadata -> config.json: `llama.embedding_length` -> hidden_size, `llama.feed_forward_length`
//! -> intermediate_size, `llama.block_count` -> num_hidden_layers, `llama.attention.head_count`
//! -> num_attention_heads, `llama.attention.head_count_kv` (default: the head count) ->
//! num_key_value_heads, `llama.attention.layer_norm_rms_epsilon` -> rms_norm_eps,
//! `llama.rope.freq_base` (default 10000) -> rope_theta, `llama.context_length` ->
//! max_position_embeddings, `llama.attention.key_length` (default hidden / heads) -> head_dim,
//! `tokenizer.ggml.bos_token_id` / `eos_token_id` -> bos/eos_token_id; vocab_size is the row count
//! of `token_embd.weight`, and tie_word_embeddings is true when there is no `output.weight`.
//! `llama.rope.scaling.type` "linear" becomes rope_scaling {"rope_type": "linear", "factor"};
//! other scaling types are refused rather than silently dropped.
//!
//! Tensor names (N = layer):
//! ```text
//! token_embd.weight          model.embed_tokens.weight
//! blk.N.attn_norm.weight     model.layers.N.input_layernorm.weight
//! blk.N.attn_q.weight        model.layers.N.self_attn.q_proj.weight   (rows un-permuted)
//! blk.N.attn_k.weight        model.layers.N.self_attn.k_proj.weight   (rows un-permuted)
//! blk.N.attn_v.weight        model.layers.N.self_attn.v_proj.weight
//! blk.N.attn_output.weight   model.layers.N.self_attn.o_proj.weight
//! blk.N.ffn_norm.weight      model.layers.N.post_attention_layernorm.weight
//! blk.N.ffn_gate.weight      model.layers.N.mlp.gate_proj.weight
//! blk.N.ffn_up.weight        model.layers.N.mlp.up_proj.weight
//! blk.N.ffn_down.weight      model.layers.N.mlp.down_proj.weight
//! output_norm.weight         model.norm.weight
//! output.weight              lm_head.weight (absent: tied to the embeddings)
//! ```
//! Any other tensor (biases, `rope_freqs.weight`, ...) is an error naming it: the folder would
//! otherwise load and compute something different from the GGUF.
//!
//! The Q/K permutation. Hugging Face's Llama applies rotary embeddings to the two halves of each
//! head (`rotate_half`: dimension i pairs with i + head_dim/2); llama.cpp pairs adjacent
//! dimensions (2i, 2i+1). llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) therefore
//! reorders the rows of q_proj (with n_head = num_attention_heads) and k_proj (with n_head =
//! num_key_value_heads) when it writes a GGUF:
//! ```text
//! w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)
//! ```
//! i.e. within each head, GGUF row 2i + j is Hugging Face row j * head_dim/2 + i. The inverse,
//! applied here, is `reshape(n_head, rows / n_head / 2, 2, cols).swapaxes(1, 2)
//! .reshape(rows, cols)` ([`unpermute_qk_rows`]; [`permute_qk_rows`] is llama.cpp's forward
//! permutation, kept for the tests).
//!
//! The folder is written into a temporary sibling folder that is renamed at the end, as
//! `model_io` does, so an interrupted conversion never leaves a half-written model under the
//! name.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;
use safetensors::Dtype;

use crate::model_io::ExportDtype;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const WEIGHTS_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The Llama hyperparameters read from a GGUF's metadata and tensor shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaGgufConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `llama.rope.scaling.factor` when `llama.rope.scaling.type` is "linear".
    pub rope_linear_factor: Option<f64>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
}

impl LlamaGgufConfig {
    /// The Hugging Face `config.json` (LlamaConfig keys) for weights saved in `dtype`.
    pub fn to_hf_json(&self, dtype: ExportDtype) -> serde_json::Value {
        let rope_scaling = match self.rope_linear_factor {
            Some(factor) => serde_json::json!({"rope_type": "linear", "type": "linear", "factor": factor}),
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": dtype.torch_dtype(),
        })
    }
}

/// What a conversion wrote, for the one-line summary.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub config: LlamaGgufConfig,
    /// Total elements over all saved tensors (the tied head counted once).
    pub parameters: usize,
    pub tensors: usize,
    pub dtype: ExportDtype,
    pub out: PathBuf,
}

impl ConvertSummary {
    pub fn line(&self, source: &Path) -> String {
        let c = &self.config;
        format!(
            "converted {} to {}: {} parameters, {} layers, {} heads, {} kv heads, vocab {}, {}{}",
            source.display(),
            self.out.display(),
            self.parameters,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            self.dtype,
            if c.tie_word_embeddings { ", tied embeddings" } else { "" },
        )
    }
}

/// llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`): rows of a
/// row-major [rows, cols] matrix in Hugging Face order to GGUF order.
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn permute_qk_rows(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, String> {
    let half = qk_half(values, rows, cols, n_head)?;
    let mut out = vec![0f32; values.len()];
    // out[h, i, j] = in[h, j, i] over (n_head, half, 2) row indices.
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * 2 * half + i * 2 + j;
                let src = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The inverse of [`permute_qk_rows`]: rows of a GGUF attn_q / attn_k matrix back to Hugging
/// Face order. `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn unpermute_qk_rows(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, String> {
    let half = qk_half(values, rows, cols, n_head)?;
    let mut out = vec![0f32; values.len()];
    // out[h, j, i] = in[h, i, j] over (n_head, 2, half) row indices.
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * 2 * half + j * half + i;
                let src = h * 2 * half + i * 2 + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

fn qk_half(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<usize, String> {
    if values.len() != rows * cols {
        return Err(format!("{} values for a [{rows}, {cols}] matrix", values.len()));
    }
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(format!("{rows} rows cannot be split into {n_head} heads of an even size"));
    }
    Ok(rows / n_head / 2)
}

/// The Hugging Face name of a GGUF tensor, or None for a tensor this converter does not know.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Metadata accessors that name the key and the file in their errors.
struct Meta<'a> {
    metadata: &'a HashMap<String, Value>,
    file: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> String {
        format!("{}: GGUF metadata key {key:?} is missing (required for a llama model)", self.file.display())
    }

    fn uint_opt(&self, key: &str) -> Result<Option<u64>, String> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| format!("{}: GGUF metadata key {key:?} is {v:?}; expected a non-negative integer", self.file.display()))
    }

    fn usize_req(&self, key: &str) -> Result<usize, String> {
        let n = self.uint_opt(key)?.ok_or_else(|| self.missing(key))?;
        let n = usize::try_from(n).map_err(|_| format!("{}: GGUF metadata key {key:?} = {n} is too large", self.file.display()))?;
        if n == 0 {
            return Err(format!("{}: GGUF metadata key {key:?} is 0; expected at least 1", self.file.display()));
        }
        Ok(n)
    }

    fn float_opt(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            // The shortest decimal that reads back as this f32 (1e-5, not 9.999999747378752e-6).
            Some(Value::F32(x)) => Ok(Some(format!("{x}").parse::<f64>().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(format!("{}: GGUF metadata key {key:?} is {v:?}; expected a float", self.file.display())),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!("{}: GGUF metadata key {key:?} is {v:?}; expected a string", self.file.display())),
        }
    }
}

/// A candle error's message without the backtrace candle appends when RUST_BACKTRACE is set.
fn candle_message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().trim_end().to_string()
}

/// Read a GGUF header (metadata and tensor table, no tensor data), naming the file in errors.
pub fn read_gguf_header(path: &Path) -> Result<(Content, BufReader<File>), BoxError> {
    let file = File::open(path).map_err(|e| format!("cannot open GGUF file {}: {e}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    let is_gguf = reader.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
    if !is_gguf {
        return Err(format!("{} is not a GGUF file (it does not start with the bytes \"GGUF\")", path.display()).into());
    }
    reader.seek(SeekFrom::Start(0)).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let content =
        Content::read(&mut reader).map_err(|e| format!("{}: not a readable GGUF file: {}", path.display(), candle_message(&e)))?;
    Ok((content, reader))
}

/// The Llama config of a GGUF's header: checks the architecture, the required metadata keys and
/// every tensor's presence and shape.
pub fn llama_config(content: &Content, file: &Path) -> Result<LlamaGgufConfig, BoxError> {
    let meta = Meta { metadata: &content.metadata, file };
    let arch = meta.string_opt("general.architecture")?.ok_or_else(|| meta.missing("general.architecture"))?;
    if arch != "llama" {
        return Err(format!(
            "{}: general.architecture is {arch:?}; convert-gguf supports only \"llama\" (LlamaForCausalLM) models",
            file.display()
        )
        .into());
    }
    let hidden = meta.usize_req("llama.embedding_length")?;
    let intermediate = meta.usize_req("llama.feed_forward_length")?;
    let layers = meta.usize_req("llama.block_count")?;
    let heads = meta.usize_req("llama.attention.head_count")?;
    let kv_heads = match meta.uint_opt("llama.attention.head_count_kv")? {
        Some(_) => meta.usize_req("llama.attention.head_count_kv")?,
        None => heads,
    };
    let rms_norm_eps = meta
        .float_opt("llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| meta.missing("llama.attention.layer_norm_rms_epsilon"))?;
    let rope_theta = meta.float_opt("llama.rope.freq_base")?.unwrap_or(10000.0);
    let context = meta.usize_req("llama.context_length")?;
    let head_dim = match meta.uint_opt("llama.attention.key_length")? {
        Some(_) => meta.usize_req("llama.attention.key_length")?,
        None => {
            if hidden % heads != 0 {
                return Err(format!(
                    "{}: llama.embedding_length {hidden} is not a multiple of llama.attention.head_count {heads} and llama.attention.key_length is missing",
                    file.display()
                )
                .into());
            }
            hidden / heads
        }
    };
    if let Some(v) = meta.uint_opt("llama.attention.value_length")? {
        if v as usize != head_dim {
            return Err(format!("{}: llama.attention.value_length {v} differs from the key length {head_dim}; LlamaConfig has one head_dim", file.display()).into());
        }
    }
    if let Some(rot) = meta.uint_opt("llama.rope.dimension_count")? {
        if rot as usize != head_dim {
            return Err(format!("{}: llama.rope.dimension_count {rot} differs from head_dim {head_dim}; partial rotary embeddings are not supported", file.display()).into());
        }
    }
    if heads % kv_heads != 0 {
        return Err(format!("{}: llama.attention.head_count {heads} is not a multiple of llama.attention.head_count_kv {kv_heads}", file.display()).into());
    }
    let rope_linear_factor = match meta.string_opt("llama.rope.scaling.type")? {
        None | Some("none") => None,
        Some("linear") => Some(meta.float_opt("llama.rope.scaling.factor")?.ok_or_else(|| meta.missing("llama.rope.scaling.factor"))?),
        Some(other) => {
            return Err(format!("{}: llama.rope.scaling.type {other:?} is not supported (only none and linear)", file.display()).into());
        }
    };

    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| format!("{}: tensor \"token_embd.weight\" is missing", file.display()))?;
    let embd_dims = embd.shape.dims();
    if embd_dims.len() != 2 || embd_dims[1] != hidden {
        return Err(format!("{}: token_embd.weight has shape {embd_dims:?}; expected [vocab, {hidden}]", file.display()).into());
    }
    let vocab = embd_dims[0];
    if let Some(v) = meta.uint_opt("llama.vocab_size")? {
        if v as usize != vocab {
            return Err(format!("{}: llama.vocab_size {v} differs from token_embd.weight's {vocab} rows", file.display()).into());
        }
    }
    let config = LlamaGgufConfig {
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_linear_factor,
        max_position_embeddings: context,
        vocab_size: vocab,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: meta.uint_opt("tokenizer.ggml.bos_token_id")?,
        eos_token_id: meta.uint_opt("tokenizer.ggml.eos_token_id")?,
    };

    // Every tensor present and known, with the shape the config implies.
    let expected = expected_shapes(&config);
    for (name, shape) in &expected {
        let info = content.tensor_infos.get(name).ok_or_else(|| format!("{}: tensor {name:?} is missing", file.display()))?;
        if info.shape.dims() != shape.as_slice() {
            return Err(format!("{}: tensor {name:?} has shape {:?}; expected {shape:?} from the metadata", file.display(), info.shape.dims()).into());
        }
    }
    let mut unknown: Vec<&String> = content.tensor_infos.keys().filter(|n| !expected.contains_key(n.as_str())).collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(format!(
            "{}: tensors with no LlamaForCausalLM counterpart: {}",
            file.display(),
            unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )
        .into());
    }
    Ok(config)
}

/// GGUF tensor name -> shape in candle's (PyTorch [out, in]) order, for every tensor a
/// llama GGUF with this config holds.
fn expected_shapes(c: &LlamaGgufConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, q, kv, ff) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
    let mut m = BTreeMap::new();
    m.insert("token_embd.weight".to_string(), vec![c.vocab_size, h]);
    m.insert("output_norm.weight".to_string(), vec![h]);
    if !c.tie_word_embeddings {
        m.insert("output.weight".to_string(), vec![c.vocab_size, h]);
    }
    for l in 0..c.num_hidden_layers {
        for (suffix, shape) in [
            ("attn_norm.weight", vec![h]),
            ("attn_q.weight", vec![q, h]),
            ("attn_k.weight", vec![kv, h]),
            ("attn_v.weight", vec![kv, h]),
            ("attn_output.weight", vec![h, q]),
            ("ffn_norm.weight", vec![h]),
            ("ffn_gate.weight", vec![ff, h]),
            ("ffn_up.weight", vec![ff, h]),
            ("ffn_down.weight", vec![h, ff]),
        ] {
            m.insert(format!("blk.{l}.{suffix}"), shape);
        }
    }
    m
}

fn encode(dtype: ExportDtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ExportDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// The tokenizer files beside the GGUF: tokenizer.json (required) and tokenizer_config.json (if
/// present).
fn tokenizer_files(gguf: &Path) -> Result<Vec<PathBuf>, BoxError> {
    let dir = gguf.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tokenizer = dir.join(TOKENIZER_FILE);
    if !tokenizer.is_file() {
        return Err(format!(
            "no {TOKENIZER_FILE} beside {}: building tokenizer.json from the GGUF's tokenizer.ggml.* metadata is not implemented; \
             put the model's Hugging Face tokenizer.json (and tokenizer_config.json, if any) at {}",
            gguf.display(),
            tokenizer.display()
        )
        .into());
    }
    let mut files = vec![tokenizer];
    let config = dir.join(TOKENIZER_CONFIG_FILE);
    if config.is_file() {
        files.push(config);
    }
    Ok(files)
}

/// Convert the llama GGUF at `gguf` into a Hugging Face LlamaForCausalLM folder `out` with
/// weights in `dtype`. An existing `out` is replaced only if it is empty or a model folder (has a
/// config.json), and only once the new folder is complete.
pub fn convert_gguf(gguf: &Path, out: &Path, dtype: ExportDtype) -> Result<ConvertSummary, BoxError> {
    let (content, mut reader) = read_gguf_header(gguf)?;
    let config = llama_config(&content, gguf)?;
    let tokenizer_files = tokenizer_files(gguf)?;
    if out.exists() {
        let is_empty_dir = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !is_empty_dir && !out.join(CONFIG_FILE).is_file() {
            return Err(format!("{} exists and is not an empty folder or a model folder (no config.json); refusing to replace it", out.display()).into());
        }
    }

    // Dequantize, rename, un-permute and encode each tensor; keep only the encoded bytes.
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut parameters = 0usize;
    for (gguf_name, shape) in expected_shapes(&config) {
        let hf_name = hf_tensor_name(&gguf_name).ok_or_else(|| format!("{}: no Hugging Face name for tensor {gguf_name:?}", gguf.display()))?;
        let qt = content
            .tensor(&mut reader, &gguf_name, &Device::Cpu)
            .map_err(|e| format!("{}: cannot read tensor {gguf_name:?}: {}", gguf.display(), candle_message(&e)))?;
        let values: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("{}: cannot dequantize tensor {gguf_name:?} ({:?}): {}", gguf.display(), qt.dtype(), candle_message(&e)))?;
        let n_head = if gguf_name.ends_with(".attn_q.weight") {
            Some(config.num_attention_heads)
        } else if gguf_name.ends_with(".attn_k.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        let values = match n_head {
            Some(n_head) => unpermute_qk_rows(&values, shape[0], shape[1], n_head)
                .map_err(|e| format!("{}: tensor {gguf_name:?}: {e}", gguf.display()))?,
            None => values,
        };
        parameters += values.len();
        tensors.push((hf_name, shape, encode(dtype, &values)));
    }

    // Write into a temporary sibling folder, then rename.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create output folder {}: {e}", parent.display()))?;
    let name = out.file_name().ok_or_else(|| format!("{} is not a folder name", out.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| format!("cannot clear {}: {e}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let written = write_folder(&tmp, &config, &tensors, &tokenizer_files, dtype);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    drop(tensors);
    if out.exists() {
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(out, &old).map_err(|e| format!("cannot move the previous {} aside: {e}", out.display()))?;
        std::fs::rename(&tmp, out).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))?;
        std::fs::remove_dir_all(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
    } else {
        std::fs::rename(&tmp, out).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), out.display()))?;
    }
    let n_tensors = expected_shapes(&config).len();
    Ok(ConvertSummary { config, parameters, tensors: n_tensors, dtype, out: out.to_path_buf() })
}

fn write_folder(
    dir: &Path,
    config: &LlamaGgufConfig,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    tokenizer_files: &[PathBuf],
    dtype: ExportDtype,
) -> Result<(), BoxError> {
    let st_dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
    };
    let views = tensors
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| format!("cannot save tensor {n} (shape {shape:?}, {} bytes as {dtype}): {e}", b.len()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = dir.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(views, Some(metadata), &weights).map_err(|e| format!("cannot write {}: {e}", weights.display()))?;
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config.to_hf_json(dtype))?;
    std::fs::write(&config_path, text).map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    for src in tokenizer_files {
        let Some(file_name) = src.file_name() else { continue };
        let dst = dir.join(file_name);
        // Read and write rather than fs::copy, which would carry over a read-only mode.
        let bytes = std::fs::read(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        std::fs::write(&dst, bytes).map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names() {
        assert_eq!(hf_tensor_name("blk.12.attn_k.weight").as_deref(), Some("model.layers.12.self_attn.k_proj.weight"));
        assert_eq!(hf_tensor_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf_tensor_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_k.weight"), None);
    }
}
