//! Sharded, atomic, resumable checkpoints (the format of ../shared/DESIGN.md, "Checkpoints"):
//!
//! ```text
//! <out_dir>/step_000500/
//!   manifest.json            format version, steps, world size, stage, dtypes, model, resolved
//!                            config, data-loader state (its RNG included), loss scaler, every
//!                            unit's layout, and each rank file's size and FNV-1a 64 checksum
//!   rank_00003.safetensors   that rank's slice of every unit's flat fp32 master weights and AdamW
//!                            moments ("<unit>.master", "<unit>.exp_avg", "<unit>.exp_avg_sq")
//!   vocab.json | tokenizer.json
//!   DONE                     written last; a folder without it is not a checkpoint
//! <out_dir>/latest           the name of the newest complete checkpoint
//! ```
//! Everything is written into `.step_000500.tmp-<pid>` and renamed once complete, so a process
//! killed mid-save leaves the previous checkpoint (and `latest`) intact. Loading re-slices the
//! flat buffers: rank r of the new world reads exactly the saved slices overlapping its range, so
//! a checkpoint resumes at any world size and stage (DeepSpeed needs a separate "universal
//! checkpoint" conversion for this).

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use datasets::{LoaderState, Tokenizer, TokenizerKind};
use models::{AnyConfig, BlockModel};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::comm::Comm;
use crate::engine::Engine;
use crate::layout::FlatLayout;
use crate::precision::LossScaler;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const DONE: &str = "DONE";
const LATEST: &str = "latest";

/// One rank file as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankFile {
    pub name: String,
    pub bytes: u64,
    /// FNV-1a 64 of the file's bytes, hex.
    pub fnv1a64: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Training-loop steps completed (the next step is `step + 1`).
    pub step: usize,
    /// AdamW steps taken (differs from `step` when f16 steps were skipped).
    pub optimizer_step: u64,
    pub world_size: usize,
    pub zero_stage: u8,
    pub compute_dtype: String,
    pub master_dtype: String,
    pub model: AnyConfig,
    /// The resolved configuration of the run that saved it (TOML).
    pub config: String,
    pub loader: LoaderState,
    pub loss_scaler: Option<LossScaler>,
    pub tokens_seen: u64,
    pub tokenizer: TokenizerKind,
    pub units: Vec<FlatLayout>,
    pub files: Vec<RankFile>,
}

/// What the training loop knows that the engine does not.
pub struct RunState<'a> {
    pub step: usize,
    pub model: &'a AnyConfig,
    pub config_toml: String,
    pub loader: LoaderState,
    pub tokens_seen: u64,
    pub tokenizer: &'a Tokenizer,
    pub compute_dtype: String,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> BoxError {
    format!("{what} {}: {e}", path.display()).into()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BoxError> {
    let mut f = std::fs::File::create(path).map_err(|e| io_err("cannot create", path, e))?;
    f.write_all(bytes).map_err(|e| io_err("cannot write", path, e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), BoxError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("cannot sync folder", dir, e))
}

pub fn step_dir_name(step: usize) -> String {
    format!("step_{step:06}")
}

fn rank_file_name(rank: usize) -> String {
    format!("rank_{rank:05}.safetensors")
}

/// Save a checkpoint of `engine` at `run.step` into `out_dir` (a collective: every rank calls it).
/// Keeps the newest `keep_last` checkpoints (0 = all). Returns the checkpoint folder.
pub fn save<M: BlockModel, C: Comm>(engine: &Engine<M, C>, out_dir: &Path, run: &RunState, keep_last: usize) -> Result<PathBuf, BoxError> {
    let comm = &engine.comm;
    let (rank, world) = (comm.rank(), comm.world_size());
    let name = step_dir_name(run.step);
    let final_dir = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if rank == 0 {
        std::fs::create_dir_all(out_dir).map_err(|e| io_err("cannot create checkpoint folder", out_dir, e))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io_err("cannot clear", &tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
    }
    comm.barrier("checkpoint")?;

    // Every rank: its slice of each unit's master weights and moments.
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, unit) in engine.units.iter().enumerate() {
        for (kind, values) in ["master", "exp_avg", "exp_avg_sq"].iter().zip(engine.shard_state(i)?) {
            tensors.push((format!("{}.{kind}", unit.layout.unit), vec![values.len()], values.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
    }
    let views = tensors
        .iter()
        .map(|(n, shape, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([("format".to_string(), "zero-candle-shard".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    let path = tmp.join(rank_file_name(rank));
    write_synced(&path, &bytes)?;
    let hash = fnv1a64(&bytes);
    let mine = [bytes.len() as u32, (bytes.len() as u64 >> 32) as u32, hash as u32, (hash >> 32) as u32];
    let mut all = vec![0u32; 4 * world];
    comm.all_gather(&mine, &mut all, "checkpoint")?;

    if rank == 0 {
        let files = all
            .chunks_exact(4)
            .enumerate()
            .map(|(r, c)| RankFile {
                name: rank_file_name(r),
                bytes: c[0] as u64 | ((c[1] as u64) << 32),
                fnv1a64: format!("{:016x}", c[2] as u64 | ((c[3] as u64) << 32)),
            })
            .collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            step: run.step,
            optimizer_step: engine.step,
            world_size: world,
            zero_stage: engine.options.stage.get(),
            compute_dtype: run.compute_dtype.clone(),
            master_dtype: "f32".into(),
            model: run.model.clone(),
            config: run.config_toml.clone(),
            loader: run.loader.clone(),
            loss_scaler: engine.loss_scaler,
            tokens_seen: run.tokens_seen,
            tokenizer: run.tokenizer.kind(),
            units: engine.units.iter().map(|u| u.layout.clone()).collect(),
            files,
        };
        write_synced(&tmp.join(MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        run.tokenizer.save(&tmp)?;
        write_synced(&tmp.join(DONE), b"")?;
        sync_dir(&tmp)?;
        if final_dir.exists() {
            let old = out_dir.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&final_dir, &old).map_err(|e| io_err("cannot move aside", &final_dir, e))?;
            std::fs::rename(&tmp, &final_dir).map_err(|e| io_err("cannot rename into place", &final_dir, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| io_err("cannot remove", &old, e))?;
        } else {
            std::fs::rename(&tmp, &final_dir).map_err(|e| io_err("cannot rename into place", &final_dir, e))?;
        }
        let latest_tmp = out_dir.join(format!(".{LATEST}.tmp-{}", std::process::id()));
        write_synced(&latest_tmp, name.as_bytes())?;
        std::fs::rename(&latest_tmp, out_dir.join(LATEST)).map_err(|e| io_err("cannot update", &out_dir.join(LATEST), e))?;
        sync_dir(out_dir)?;
        prune(out_dir, keep_last)?;
    }
    comm.barrier("checkpoint")?;
    Ok(final_dir)
}

/// Remove complete checkpoints older than the newest `keep_last` (0 keeps all), and the
/// temporary folders of saves that a killed process left behind (never a complete checkpoint).
fn prune(out_dir: &Path, keep_last: usize) -> Result<(), BoxError> {
    let mine = format!("-{}", std::process::id());
    for entry in std::fs::read_dir(out_dir).map_err(|e| io_err("cannot list", out_dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let stale = name.starts_with(".step_") && (name.contains(".tmp-") || name.contains(".old-")) && !name.ends_with(&mine);
        if stale {
            std::fs::remove_dir_all(entry.path()).map_err(|e| io_err("cannot remove stale temporary folder", &entry.path(), e))?;
        }
    }
    if keep_last == 0 {
        return Ok(());
    }
    let mut steps: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .map_err(|e| io_err("cannot list", out_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step_")) && p.join(DONE).is_file())
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep_last);
    for old in &steps[..excess] {
        std::fs::remove_dir_all(old).map_err(|e| io_err("cannot remove old checkpoint", old, e))?;
    }
    Ok(())
}

/// `latest` (the newest complete checkpoint under `out_dir`) or a checkpoint folder path.
pub fn resolve(arg: &Path, out_dir: &Path) -> Result<PathBuf, BoxError> {
    if arg.as_os_str() != LATEST {
        return Ok(arg.to_path_buf());
    }
    let pointer = out_dir.join(LATEST);
    let name = std::fs::read_to_string(&pointer)
        .map_err(|e| format!("cannot resume from `latest`: cannot read {} ({e}); no checkpoint has been saved in {}", pointer.display(), out_dir.display()))?;
    Ok(out_dir.join(name.trim()))
}

/// Read and check a checkpoint's manifest (DONE present, format version known).
pub fn read_manifest(dir: &Path) -> Result<Manifest, BoxError> {
    if !dir.is_dir() {
        return Err(format!("checkpoint {} does not exist", dir.display()).into());
    }
    if !dir.join(DONE).is_file() {
        return Err(format!(
            "{} has no DONE file: it is an incomplete checkpoint (a save was interrupted); resume from an earlier one or `latest`",
            dir.display()
        )
        .into());
    }
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| io_err("cannot read", &path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| format!("{}: not a valid checkpoint manifest: {e}", path.display()))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(format!("{}: format version {} is not supported (this build reads {FORMAT_VERSION})", path.display(), manifest.format_version).into());
    }
    if manifest.files.len() != manifest.world_size || manifest.units.is_empty() {
        return Err(format!("{}: lists {} rank files for world size {}", path.display(), manifest.files.len(), manifest.world_size).into());
    }
    Ok(manifest)
}

/// Reads saved shards (each file once, size and checksum verified) and assembles ranges.
pub struct ShardReader<'a> {
    dir: &'a Path,
    manifest: &'a Manifest,
    files: HashMap<usize, Vec<u8>>,
}

impl<'a> ShardReader<'a> {
    pub fn new(dir: &'a Path, manifest: &'a Manifest) -> Self {
        Self { dir, manifest, files: HashMap::new() }
    }

    fn file(&mut self, rank: usize) -> Result<&[u8], BoxError> {
        if !self.files.contains_key(&rank) {
            let entry = &self.manifest.files[rank];
            let path = self.dir.join(&entry.name);
            let bytes = std::fs::read(&path).map_err(|e| format!("checkpoint {}: cannot read rank file {} ({e})", self.dir.display(), path.display()))?;
            if bytes.len() as u64 != entry.bytes {
                return Err(format!("{}: {} bytes, the manifest says {} (truncated or replaced)", path.display(), bytes.len(), entry.bytes).into());
            }
            if format!("{:016x}", fnv1a64(&bytes)) != entry.fnv1a64 {
                return Err(format!("{}: checksum mismatch (the file is corrupted)", path.display()).into());
            }
            self.files.insert(rank, bytes);
        }
        Ok(&self.files[&rank])
    }

    /// Values of `kind` ("master", "exp_avg", "exp_avg_sq") of unit `u` over `range` of its flat
    /// buffer; elements past the unit's parameters (padding) are zero.
    pub fn read_range(&mut self, u: usize, kind: &str, range: &Range<usize>) -> Result<Vec<f32>, BoxError> {
        let layout = &self.manifest.units[u];
        let unit_name = layout.unit.clone();
        let shard = layout.padded_numel / self.manifest.world_size;
        let mut out = vec![0f32; range.len()];
        let wanted = range.start..range.end.min(layout.numel);
        let mut pos = wanted.start;
        while pos < wanted.end {
            let r = pos / shard;
            let file_range = r * shard..(r + 1) * shard;
            let end = wanted.end.min(file_range.end);
            let dir = self.dir.display().to_string();
            let name = format!("{unit_name}.{kind}");
            let bytes = self.file(r)?;
            let st = SafeTensors::deserialize(bytes).map_err(|e| format!("{dir}/{}: not a valid safetensors file ({e})", rank_file_name(r)))?;
            let view = st.tensor(&name).map_err(|e| format!("{dir}/{}: no tensor {name} ({e})", rank_file_name(r)))?;
            if view.dtype() != Dtype::F32 || view.data().len() != shard * 4 {
                return Err(format!("{dir}/{}: tensor {name} has {} bytes of {:?}, expected {} f32 values", rank_file_name(r), view.data().len(), view.dtype(), shard).into());
            }
            let data = &view.data()[(pos - file_range.start) * 4..(end - file_range.start) * 4];
            for (o, c) in out[pos - range.start..end - range.start].iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            pos = end;
        }
        Ok(out)
    }
}

/// Check that a manifest was saved for this model (config and every parameter's name, shape and
/// offset).
pub fn check_compatible(dir: &Path, manifest: &Manifest, model: &AnyConfig, layouts: &[&FlatLayout]) -> Result<(), BoxError> {
    if &manifest.model != model {
        return Err(format!(
            "checkpoint {} was saved for model {:?}; this run builds {:?}: use the same [model] settings",
            dir.display(),
            manifest.model,
            model
        )
        .into());
    }
    let same = manifest.units.len() == layouts.len()
        && manifest.units.iter().zip(layouts).all(|(a, b)| {
            a.unit == b.unit && a.numel == b.numel && a.params.iter().zip(&b.params).all(|(p, q)| p.name == q.name && p.shape == q.shape && p.offset == q.offset)
        });
    if !same {
        return Err(format!("checkpoint {}: its parameter layout differs from this model's", dir.display()).into());
    }
    Ok(())
}

/// Restore `engine` (any world size and stage) from a checkpoint (a collective at stages 1-2).
pub fn restore<M: BlockModel, C: Comm>(engine: &mut Engine<M, C>, dir: &Path, manifest: &Manifest, model: &AnyConfig) -> Result<(), BoxError> {
    let layouts: Vec<&FlatLayout> = engine.units.iter().map(|u| &u.layout).collect();
    check_compatible(dir, manifest, model, &layouts)?;
    let mut reader = ShardReader::new(dir, manifest);
    for i in 0..engine.units.len() {
        let range = engine.units[i].opt_range.clone();
        let master = reader.read_range(i, "master", &range)?;
        let exp_avg = reader.read_range(i, "exp_avg", &range)?;
        let exp_avg_sq = reader.read_range(i, "exp_avg_sq", &range)?;
        engine.set_unit_state(i, master, exp_avg, exp_avg_sq)?;
    }
    if engine.loss_scaler.is_some() {
        if let Some(s) = manifest.loss_scaler {
            engine.loss_scaler = Some(s);
        }
    }
    engine.finish_restore(manifest.optimizer_step)?;
    Ok(())
}

/// Every parameter of a checkpoint as (name, shape, fp32 values), for export.
pub fn full_parameters(dir: &Path, manifest: &Manifest) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>, BoxError> {
    let mut reader = ShardReader::new(dir, manifest);
    let mut out = Vec::new();
    for (i, layout) in manifest.units.iter().enumerate() {
        let full = reader.read_range(i, "master", &(0..layout.numel))?;
        out.extend(layout.params.iter().map(|p| (p.name.clone(), p.shape.clone(), full[p.range()].to_vec())));
    }
    Ok(out)
}

/// The tokenizer saved in a checkpoint folder.
pub fn tokenizer(dir: &Path, manifest: &Manifest) -> Result<Tokenizer, BoxError> {
    Ok(Tokenizer::load(dir, manifest.tokenizer)?)
}
