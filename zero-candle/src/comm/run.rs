//! `run_ranks`: one closure per rank of a `LocalComm` group, each on a scoped thread, and the
//! root cause of a failed run. Each rank's end is reported to the group (departed, failed with
//! its error text, or panicked with the panic message); the group records failures in the order
//! they happen, so the first one is the cause and later ones are the peers it brought down.

use super::local::{new_group, Shared};
use super::LocalComm;
use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread;
use std::time::Duration;

/// How a rank of `run_ranks` ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankError {
    pub rank: usize,
    /// The rank panicked (`message` is the panic message) rather than returning an error.
    pub panicked: bool,
    pub message: String,
}

impl fmt::Display for RankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.panicked { "panicked" } else { "failed" };
        write!(f, "rank {} {how}: {}", self.rank, self.message)
    }
}

impl std::error::Error for RankError {}

/// Runs `f` once per rank of a new `LocalComm` group, each on its own scoped thread (none is left
/// running on return). A rank that returns `Err` or panics aborts the group with its message, so
/// its peers fail at once. Returns the results in rank order, or the root cause: the failure that
/// happened first, not the errors it induced in the other ranks.
pub fn run_ranks<T: Send, E: fmt::Display>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(LocalComm) -> Result<T, E> + Sync,
) -> Result<Vec<T>, RankError> {
    let comms = new_group(world_size, timeout, true);
    let Some(shared) = comms.first().map(|c| c.shared.clone()) else { return Ok(Vec::new()) };
    let f = &f;
    let outcomes: Vec<Result<T, RankError>> = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(world_size);
        for comm in comms {
            let (rank, shared) = (comm.rank, comm.shared.clone());
            let spawned = thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn_scoped(scope, move || run_rank(rank, &shared, f, comm));
            handles.push((rank, spawned.map_err(|e| e.to_string())));
        }
        let mut outcomes = Vec::with_capacity(world_size);
        for (rank, handle) in handles {
            outcomes.push(match handle {
                Ok(h) => h.join().unwrap_or_else(|p| Err(panicked(rank, p.as_ref()))),
                Err(why) => {
                    let message = format!("could not start its thread: {why}");
                    shared.fail(rank, &message);
                    Err(RankError { rank, panicked: false, message })
                }
            });
        }
        outcomes
    });
    if let Some((rank, reason)) = shared.failures().into_iter().next() {
        return Err(match outcomes.into_iter().nth(rank) {
            Some(Err(e)) => e,
            _ => RankError { rank, panicked: false, message: reason },
        });
    }
    outcomes.into_iter().collect()
}

/// One rank of `run_ranks`: calls `f`, then reports how it ended to the group.
fn run_rank<T, E: fmt::Display>(
    rank: usize,
    shared: &Shared,
    f: &(impl Fn(LocalComm) -> Result<T, E> + Sync),
    comm: LocalComm,
) -> Result<T, RankError> {
    match catch_unwind(AssertUnwindSafe(|| f(comm))) {
        Ok(Ok(value)) => {
            shared.depart(rank);
            Ok(value)
        }
        Ok(Err(e)) => {
            let message = e.to_string();
            shared.fail(rank, &message);
            Err(RankError { rank, panicked: false, message })
        }
        Err(payload) => {
            let e = panicked(rank, payload.as_ref());
            shared.fail(rank, &format!("panicked: {}", e.message));
            Err(e)
        }
    }
}

fn panicked(rank: usize, payload: &(dyn Any + Send)) -> RankError {
    let message = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(a panic without a message)".to_string(),
    };
    RankError { rank, panicked: true, message }
}
