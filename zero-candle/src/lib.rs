//! zero-candle: a training engine for candle models with ZeRO-style sharding in mind.
//!
//! Layers, top-down: `train` (the loop behind `zero-candle train`), `engine` (flat fp32 master
//! weights and AdamW moments per unit, block-by-block forward and backward), `layout` (flat
//! buffers and their offset tables), `config` (TOML with documented defaults), `metrics`,
//! `schedule`, `sample`, `model_io` (the model folder with Hugging Face names) and `bench`.

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod estimate;
pub mod eval;
pub mod export;
pub mod gguf;
pub mod grad;
pub mod layout;
pub mod metrics;
pub mod model_io;
pub mod precision;
pub mod rng;
pub mod sample;
pub mod schedule;
pub mod signals;
pub mod stage;
pub mod train;

pub use config::Config;
pub use engine::{Engine, EngineOptions, MemoryReport, MicroBatch, StepStats};
pub use stage::{Buffer, ZeroStage};
