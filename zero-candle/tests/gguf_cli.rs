//! `zero-candle convert-gguf` end to end: the shared SmolLM2-135M-Instruct Q4_1 GGUF to a Hugging
//! Face LlamaForCausalLM folder (config values, every tensor name and [out, in] shape, f32 and
//! bf16, the tokenizer copied), a tiny synthetic llama GGUF with known values (the Q/K rows come
//! back in Hugging Face order, matrices keep their layout), the Q/K permutation itself, and
//! the errors: missing file, non-GGUF file, non-llama architecture, missing metadata key, missing
//! tokenizer.json, unwritable output.
//!
//! The expected SmolLM2 values were read from the GGUF's metadata (general.architecture llama,
//! llama.block_count 30, llama.attention.head_count 9, head_count_kv 3, embedding_length 576,
//! feed_forward_length 1536, context_length 8192, rope.freq_base 100000, layer_norm_rms_epsilon
//! 1e-5, vocab_size 49152, bos 1, eos 2; no output.weight).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use zero_candle::gguf::{permute_qk_rows, unpermute_qk_rows};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn smollm2_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/smollm2-135m-instruct")
}

fn smollm2_gguf() -> PathBuf {
    let path = smollm2_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "the shared test model is missing: {} (expected the SmolLM2-135M-Instruct Q4_1 GGUF there)", path.display());
    path
}

fn zero_candle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zero-candle")).args(args).current_dir(root()).output().expect("run zero-candle")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zc-gguf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn convert(gguf: &Path, out: &Path, dtype: &str) -> Output {
    zero_candle(&["convert-gguf", &gguf.display().to_string(), "--out", &out.display().to_string(), "--dtype", dtype])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The safetensors header's metadata map, read directly.
fn safetensors_metadata(bytes: &[u8]) -> serde_json::Value {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

fn expected_smollm2_shapes() -> HashMap<String, Vec<usize>> {
    let (h, ff, q, kv, vocab) = (576, 1536, 9 * 64, 3 * 64, 49152);
    let mut m = HashMap::from([("model.embed_tokens.weight".to_string(), vec![vocab, h]), ("model.norm.weight".to_string(), vec![h])]);
    for l in 0..30 {
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![ff, h]),
            ("mlp.up_proj.weight", vec![ff, h]),
            ("mlp.down_proj.weight", vec![h, ff]),
        ] {
            m.insert(format!("model.layers.{l}.{name}"), shape);
        }
    }
    m
}

/// One GGUF tensor dequantized by candle, straight from the file.
fn gguf_tensor(path: &Path, name: &str) -> Vec<f32> {
    let (content, mut reader) = zero_candle::gguf::read_gguf_header(path).unwrap();
    let qt = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
    qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn converts_smollm2_gguf_to_a_llama_folder() {
    let gguf = smollm2_gguf();
    let out = temp("smollm2");
    let o = convert(&gguf, &out, "f32");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "convert-gguf failed:\n{stdout}\n{}", stderr(&o));
    for part in ["134515008 parameters", "30 layers", "9 heads", "3 kv heads", "vocab 49152", "f32"] {
        assert!(stdout.contains(part), "summary lacks {part:?}: {stdout}");
    }
    assert_eq!(stdout.trim_end().lines().count(), 1, "one summary line: {stdout}");

    let c = read_config(&out);
    assert_eq!(c["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert_eq!(c["hidden_act"], "silu");
    assert_eq!(c["torch_dtype"], "float32");

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(safetensors_metadata(&bytes), serde_json::json!({"format": "pt"}));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let expected = expected_smollm2_shapes();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = expected.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want, "tensor names (tied: no lm_head.weight)");
    for (name, shape) in &expected {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
    }
    // F32 tensors in the GGUF are copied exactly; q/k are llama.cpp's rows un-permuted with 9 and
    // 3 heads (the order itself is checked on known values in tiny_gguf_*).
    let norm = f32s(st.tensor("model.norm.weight").unwrap().data());
    assert_eq!(norm, gguf_tensor(&gguf, "output_norm.weight"));
    let k = f32s(st.tensor("model.layers.7.self_attn.k_proj.weight").unwrap().data());
    assert_eq!(k, unpermute_qk_rows(&gguf_tensor(&gguf, "blk.7.attn_k.weight"), 192, 576, 3).unwrap());
    let v = f32s(st.tensor("model.layers.7.self_attn.v_proj.weight").unwrap().data());
    assert_eq!(v, gguf_tensor(&gguf, "blk.7.attn_v.weight"), "v is not permuted");

    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(smollm2_dir().join(f)).unwrap(), "{f} copied");
    }
    drop(st);
    drop(bytes);

    // bf16: same names, half the bytes, config says so; converting again replaces the folder.
    let o = convert(&gguf, &out, "bf16");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_config(&out)["torch_dtype"], "bfloat16");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), expected.len());
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == Dtype::BF16));
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let leftovers: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn permutation_round_trip_and_hand_checked_case() {
    // Round trip: 3 heads of head_dim 4, 5 columns.
    let (rows, cols, n_head) = (12, 5, 3);
    let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let p = permute_qk_rows(&w, rows, cols, n_head).unwrap();
    assert_ne!(p, w);
    assert_eq!(unpermute_qk_rows(&p, rows, cols, n_head).unwrap(), w);
    assert_eq!(permute_qk_rows(&unpermute_qk_rows(&w, rows, cols, n_head).unwrap(), rows, cols, n_head).unwrap(), w);

    // By hand: two heads of head_dim 4, one column holding the Hugging Face row index. llama.cpp
    // (w.reshape(2, 2, 2, 1).swapaxes(1, 2)) interleaves each head's halves: [0 1 | 2 3] -> [0 2 1 3].
    let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let gguf = permute_qk_rows(&hf, 8, 1, 2).unwrap();
    assert_eq!(gguf, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(unpermute_qk_rows(&gguf, 8, 1, 2).unwrap(), hf);
    // Whole rows move (two columns), one head of head_dim 4.
    assert_eq!(
        unpermute_qk_rows(&[0., 0.5, 2., 2.5, 1., 1.5, 3., 3.5], 4, 2, 1).unwrap(),
        vec![0., 0.5, 1., 1.5, 2., 2.5, 3., 3.5]
    );
    // Rows that do not split into heads of an even size, and a wrong value count.
    assert!(unpermute_qk_rows(&hf, 8, 1, 3).is_err());
    assert!(unpermute_qk_rows(&hf, 4, 1, 1).is_err());
}

// --- tiny synthetic GGUFs ---

const H: usize = 8;
const HEADS: usize = 2;
const KV: usize = 1;
const HD: usize = 4;
const FF: usize = 12;
const VOCAB: usize = 10;

/// Distinct values identifying (tensor, row, col).
fn known(tag: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| (tag * 10000 + (i / cols) * 100 + i % cols) as f32).collect()
}

fn qtensor(values: &[f32], shape: &[usize]) -> QTensor {
    let t = Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

/// A one-layer llama GGUF in `dir` whose Hugging Face weights are `known(..)`, stored the way
/// llama.cpp stores them (q/k rows permuted). `edit` adjusts the metadata.
fn write_tiny_gguf(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.embedding_length".into(), Value::U32(H as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(KV as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-6)),
        ("llama.context_length".into(), Value::U32(64)),
    ];
    edit(&mut meta);
    let tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", qtensor(&known(1, VOCAB, H), &[VOCAB, H])),
        ("output_norm.weight", qtensor(&known(2, 1, H), &[H])),
        ("output.weight", qtensor(&known(3, VOCAB, H), &[VOCAB, H])),
        ("blk.0.attn_norm.weight", qtensor(&known(4, 1, H), &[H])),
        ("blk.0.attn_q.weight", qtensor(&permute_qk_rows(&known(5, HEADS * HD, H), HEADS * HD, H, HEADS).unwrap(), &[HEADS * HD, H])),
        ("blk.0.attn_k.weight", qtensor(&permute_qk_rows(&known(6, KV * HD, H), KV * HD, H, KV).unwrap(), &[KV * HD, H])),
        ("blk.0.attn_v.weight", qtensor(&known(7, KV * HD, H), &[KV * HD, H])),
        ("blk.0.attn_output.weight", qtensor(&known(8, H, HEADS * HD), &[H, HEADS * HD])),
        ("blk.0.ffn_norm.weight", qtensor(&known(9, 1, H), &[H])),
        ("blk.0.ffn_gate.weight", qtensor(&known(10, FF, H), &[FF, H])),
        ("blk.0.ffn_up.weight", qtensor(&known(11, FF, H), &[FF, H])),
        ("blk.0.ffn_down.weight", qtensor(&known(12, H, FF), &[H, FF])),
    ];
    let path = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

#[test]
fn tiny_gguf_round_trips_known_weights() {
    let dir = temp("tiny");
    let gguf = write_tiny_gguf(&dir, |_| {});
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    let out = dir.join("hf");
    let o = convert(&gguf, &out, "f32");
    assert!(o.status.success(), "{}", stderr(&o));
    let c = read_config(&out);
    assert_eq!(c["tie_word_embeddings"], false, "output.weight present");
    assert_eq!(c["rope_theta"].as_f64(), Some(10000.0), "default without llama.rope.freq_base");
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(c["num_key_value_heads"], KV);
    assert_eq!(c["vocab_size"], VOCAB);
    assert!(c["bos_token_id"].is_null() && c["eos_token_id"].is_null(), "no tokenizer.ggml ids");
    assert!(!out.join("tokenizer_config.json").exists());

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 12);
    for (name, tag, rows, cols) in [
        ("model.embed_tokens.weight", 1, VOCAB, H),
        ("lm_head.weight", 3, VOCAB, H),
        ("model.layers.0.self_attn.q_proj.weight", 5, HEADS * HD, H),
        ("model.layers.0.self_attn.k_proj.weight", 6, KV * HD, H),
        ("model.layers.0.self_attn.v_proj.weight", 7, KV * HD, H),
        ("model.layers.0.self_attn.o_proj.weight", 8, H, HEADS * HD),
        ("model.layers.0.mlp.gate_proj.weight", 10, FF, H),
        ("model.layers.0.mlp.up_proj.weight", 11, FF, H),
        ("model.layers.0.mlp.down_proj.weight", 12, H, FF),
    ] {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), &[rows, cols], "{name}");
        assert_eq!(f32s(t.data()), known(tag, rows, cols), "{name}: values in Hugging Face order");
    }
    for (name, tag) in [("model.norm.weight", 2), ("model.layers.0.input_layernorm.weight", 4), ("model.layers.0.post_attention_layernorm.weight", 9)] {
        assert_eq!(f32s(st.tensor(name).unwrap().data()), known(tag, 1, H), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_name_the_file_key_or_folder() {
    let dir = temp("errors");
    std::fs::create_dir_all(&dir).unwrap();

    // Missing file.
    let missing = dir.join("nope.gguf");
    let o = convert(&missing, &dir.join("out"), "f32");
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&missing.display().to_string()), "{}", stderr(&o));

    // Not a GGUF file.
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "just some text, not a model").unwrap();
    let o = convert(&text, &dir.join("out"), "f32");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&text.display().to_string()) && e.contains("not a GGUF file"), "{e}");

    // Not llama.
    let gguf = write_tiny_gguf(&dir.join("gpt2"), |m| m[0].1 = Value::String("gpt2".into()));
    let o = convert(&gguf, &dir.join("out"), "f32");
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("\"gpt2\"") && e.contains("only \"llama\"") && e.contains(&gguf.display().to_string()), "{e}");

    // A required metadata key missing.
    let key = "llama.attention.layer_norm_rms_epsilon";
    let gguf = write_tiny_gguf(&dir.join("nokey"), |m| m.retain(|(k, _)| k != key));
    let o = convert(&gguf, &dir.join("out"), "f32");
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains(key) && e.contains(&gguf.display().to_string()), "{e}");

    // No tokenizer.json beside the GGUF.
    let gguf = write_tiny_gguf(&dir.join("notok"), |_| {});
    let o = convert(&gguf, &dir.join("out"), "f32");
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("not implemented") && e.contains(&dir.join("notok").join("tokenizer.json").display().to_string()), "{e}");
    assert!(!dir.join("out").exists(), "nothing written on error");

    // Unwritable output: a folder inside a regular file.
    std::fs::write(dir.join("notok").join("tokenizer.json"), "{}").unwrap();
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let o = convert(&gguf, &blocker.join("out"), "f32");
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains(&blocker.display().to_string()), "{e}");

    // An existing folder that is not a model folder is not replaced.
    let keep = dir.join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("precious.txt"), "data").unwrap();
    let o = convert(&gguf, &keep, "f32");
    assert!(!o.status.success() && stderr(&o).contains("refusing"), "{}", stderr(&o));
    assert!(keep.join("precious.txt").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
