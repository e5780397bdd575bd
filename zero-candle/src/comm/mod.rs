//! Collective communication between ranks: the `Comm` trait the engine is generic over, the
//! element types it moves, its errors, and `LocalComm` (ranks as threads of one process, in
//! `local`). NCCL and MPI backends implement the same trait.
//!
//! Design, after the ZeRO paper (Rajbhandari et al. 2020, arXiv:1910.02054) and torchtitan's
//! collectives with a timeout:
//! - Reductions add contributions in rank order, starting from rank 0's value, as in
//!   `((x0 + x1) + x2) + x3`. Float addition is not associative, so a sum in arrival order would
//!   change in the last bits from run to run; in rank order it is bitwise reproducible, every rank
//!   gets the same bits, and at world size 1 the result is the input unchanged. This is what lets
//!   the tests compare ZeRO stages bitwise.
//! - Every collective carries a sequence number (one counter per communicator, advanced on every
//!   call, so it is the same on all ranks of a correct program) and the sharding unit it moves.
//!   Ranks that call different ops, element types or lengths at the same number fail at once with
//!   a `CommError` that says which rank called what, instead of exchanging garbage or hanging.
//! - Failure propagates: a rank that aborts (its step returned an error, its thread panicked) is
//!   recorded with its reason, and every peer blocked in or entering a collective fails at once
//!   with "rank r failed: reason"; a rank that left the group fails the peers that still need it.
//!   The group also has a timeout (the engine's default is 300 s): a collective that waits longer
//!   for its peers fails with the ranks it was waiting for, so a lost rank never hangs a run.
//! - Asynchronous forms deposit this rank's contribution at call time and return a `Pending`
//!   handle, so gathering the next block's parameters overlaps with computing the current one.

mod local;
mod run;

pub use local::LocalComm;
pub use run::{run_ranks, RankError};

use std::fmt;
use std::ops::AddAssign;
use std::time::Duration;

/// A value a collective can move: plain data, shared between rank threads.
pub trait Element: Copy + Default + Send + Sync + 'static {}

impl Element for f32 {}
impl Element for f64 {}
impl Element for u16 {}
impl Element for u32 {}
impl Element for half::bf16 {}
impl Element for half::f16 {}

/// A value a reduction can add (the reduce dtype: fp32, or fp64 for references).
pub trait Summable: Element + AddAssign {}

impl Summable for f32 {}
impl Summable for f64 {}

/// The collective operations, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    AllReduceSum,
    ReduceScatterSum,
    AllGather,
    Broadcast,
    Barrier,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::ReduceScatterSum => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        })
    }
}

/// A collective whose contribution is already deposited; `wait` returns its result (the full
/// buffer of an all-gather, this rank's reduced shard of a reduce-scatter).
pub struct Pending<T> {
    finish: Box<dyn FnOnce() -> Result<Vec<T>, CommError> + Send>,
}

impl<T> Pending<T> {
    /// A handle finished by `finish` (for backends). Dropping it without `wait` drops `finish`.
    pub fn new(finish: impl FnOnce() -> Result<Vec<T>, CommError> + Send + 'static) -> Self {
        Pending { finish: Box::new(finish) }
    }

    /// Blocks until every peer has contributed, then returns the result. The group's timeout
    /// counts from this call, not from the deposit, so overlapped work never eats into it.
    pub fn wait(self) -> Result<Vec<T>, CommError> {
        (self.finish)()
    }
}

impl<T> fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pending")
    }
}

/// A group of `world_size` ranks that run the same sequence of collectives. `unit` names the
/// sharding unit being communicated ("block.3", "root"); it only appears in errors.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The sequence number the next collective will carry (= collectives called so far).
    fn next_seq(&self) -> u64;
    /// Marks this rank failed: every peer blocked in or entering a collective fails at once with
    /// "rank r failed: reason".
    fn abort(&self, reason: &str);

    /// Sums `buf` over ranks (in rank order) and writes the sum back on every rank.
    fn all_reduce_sum<T: Summable>(&self, buf: &mut [T], unit: &str) -> Result<(), CommError>;
    /// `input.len() == world_size * output.len()`; rank r's `output` becomes the sum over ranks
    /// of `input[r * n..(r + 1) * n]`.
    fn reduce_scatter_sum<T: Summable>(
        &self,
        input: &[T],
        output: &mut [T],
        unit: &str,
    ) -> Result<(), CommError>;
    /// `full.len() == world_size * shard.len()`; `full` becomes every rank's shard in rank order.
    fn all_gather<T: Element>(
        &self,
        shard: &[T],
        full: &mut [T],
        unit: &str,
    ) -> Result<(), CommError>;
    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast<T: Element>(
        &self,
        buf: &mut [T],
        root: usize,
        unit: &str,
    ) -> Result<(), CommError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self, unit: &str) -> Result<(), CommError>;
    /// `all_gather` with `shard` deposited now; `wait` returns the full buffer.
    fn all_gather_async<T: Element>(
        &self,
        shard: Vec<T>,
        unit: &str,
    ) -> Result<Pending<T>, CommError>;
    /// `reduce_scatter_sum` with `input` deposited now; `wait` returns this rank's summed shard.
    fn reduce_scatter_sum_async<T: Summable>(
        &self,
        input: Vec<T>,
        unit: &str,
    ) -> Result<Pending<T>, CommError>;
}

/// A failed collective: which op, its sequence number, the unit, this rank, and what went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct CommError {
    pub op: Op,
    pub seq: u64,
    pub unit: String,
    pub rank: usize,
    pub kind: CommErrorKind,
}

/// What went wrong in a collective.
#[derive(Debug, Clone, PartialEq)]
pub enum CommErrorKind {
    /// The group's timeout passed while `missing` had not contributed.
    TimedOut { after: Duration, missing: Vec<usize> },
    /// A rank aborted (the first one to do so in this group).
    RankFailed { rank: usize, reason: String },
    /// A rank this collective still needs has dropped its communicator.
    RankLeft { rank: usize },
    /// `rank` called a different op (or unit) at the same sequence number.
    OpMismatch { rank: usize, op: Op, unit: String },
    /// `rank` contributed a buffer of another length.
    LengthMismatch { len: usize, rank: usize, other_len: usize },
    /// `rank` contributed another element type.
    TypeMismatch { elem: &'static str, rank: usize, other_elem: &'static str },
    /// `rank` named another broadcast root.
    RootMismatch { root: usize, rank: usize, other_root: usize },
    /// This rank's own arguments are inconsistent (buffer sizes, root out of range).
    BadArgument(String),
    /// The group's shared state is unusable (a thread panicked while holding its lock).
    Poisoned,
}

impl CommError {
    pub fn new(op: Op, seq: u64, unit: &str, rank: usize, kind: CommErrorKind) -> Self {
        CommError { op, seq, unit: unit.to_string(), rank, kind }
    }
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} #{} (unit {}) on rank {}: ", self.op, self.seq, self.unit, self.rank)?;
        match &self.kind {
            CommErrorKind::TimedOut { after, missing } => {
                write!(f, "timed out after {} waiting for ranks {missing:?}", seconds(*after))
            }
            CommErrorKind::RankFailed { rank, reason } => write!(f, "rank {rank} failed: {reason}"),
            CommErrorKind::RankLeft { rank } => write!(f, "rank {rank} has left the group"),
            CommErrorKind::OpMismatch { rank, op, unit } => {
                write!(f, "rank {rank} called {op} #{} (unit {unit}) instead", self.seq)
            }
            CommErrorKind::LengthMismatch { len, rank, other_len } => {
                write!(f, "buffer length {len} differs from rank {rank}'s {other_len}")
            }
            CommErrorKind::TypeMismatch { elem, rank, other_elem } => {
                write!(f, "element type {elem} differs from rank {rank}'s {other_elem}")
            }
            CommErrorKind::RootMismatch { root, rank, other_root } => {
                write!(f, "root {root} differs from rank {rank}'s root {other_root}")
            }
            CommErrorKind::BadArgument(what) => f.write_str(what),
            CommErrorKind::Poisoned => f.write_str(
                "the group's shared state is poisoned (a thread panicked while holding its lock)",
            ),
        }
    }
}

impl std::error::Error for CommError {}

/// "300 s", "0.2 s": a timeout as a person wrote it.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}
