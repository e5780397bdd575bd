//! Models driven block by block, as the ZeRO engine needs them.
//!
//! A model here is a set of *units*: a root unit (embeddings, final norm, head) and one unit per
//! transformer block, each a list of named parameters. The engine owns the parameters (it shards,
//! gathers and updates them); the model is pure compute over tensors it is handed. This follows
//! torchtitan's rule that models know nothing of parallelism, and it lets the engine run the
//! backward one block at a time (see docs/ARCHITECTURE.md, "Why per-block backward").

pub mod any;
pub mod block_model;
pub mod gpt2;
pub mod llama;

pub use any::{AnyConfig, AnyModel};
pub use block_model::{BlockModel, Carry, Init, KvCache, ParamSpec, UnitSpec};
pub use gpt2::{Gpt2, Gpt2Config};
pub use llama::{Llama, LlamaConfig};
