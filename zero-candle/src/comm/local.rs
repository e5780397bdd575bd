//! `LocalComm`: N ranks as threads of one process (tests, laptops). `run` drives a group of
//! them on scoped threads.
//!
//! The group shares one `State` behind a mutex and a condition variable: a slot per sequence
//! number where each rank deposits a description of its call and a copy of its contribution.
//! A rank whose slot is complete clones the contributions (reference-counted, no copy) and
//! computes its own result outside the lock, in rank order, so every rank gets the same bits.
//! The last rank to release a slot removes it. Failures are recorded in the order they happen;
//! that order is how `run_ranks` tells the root cause from the errors it induced in the peers.

use super::{Comm, CommError, CommErrorKind, Element, Op, Pending, Summable};
use std::any::{type_name, Any};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// One rank's contribution to a slot: a `Vec<T>` behind a reference count.
type Data = Arc<dyn Any + Send + Sync>;

/// What a rank called at one sequence number; peers compare theirs against it.
#[derive(Debug, Clone)]
struct Call {
    op: Op,
    unit: String,
    len: usize,
    elem: &'static str,
    root: usize,
}

struct Slot {
    calls: Vec<Option<Call>>,
    data: Vec<Option<Data>>,
    released: Vec<bool>,
}

struct State {
    slots: HashMap<u64, Slot>,
    /// (rank, reason) in the order ranks failed; the first is the root cause.
    failures: Vec<(usize, String)>,
    departed: Vec<bool>,
}

pub(super) struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.lock().ok()
    }

    /// Records `rank` as failed (once; the first reason stays) and wakes every waiting peer.
    pub(super) fn fail(&self, rank: usize, reason: &str) {
        if let Some(mut state) = self.lock() {
            if !state.failures.iter().any(|(r, _)| *r == rank) {
                state.failures.push((rank, reason.to_string()));
            }
        }
        self.changed.notify_all();
    }

    pub(super) fn depart(&self, rank: usize) {
        if let Some(mut state) = self.lock() {
            if let Some(d) = state.departed.get_mut(rank) {
                *d = true;
            }
        }
        self.changed.notify_all();
    }

    pub(super) fn failures(&self) -> Vec<(usize, String)> {
        self.lock().map(|s| s.failures.clone()).unwrap_or_default()
    }
}

/// One rank's handle on a group of threads. Move each to its own thread.
pub struct LocalComm {
    pub(super) shared: Arc<Shared>,
    pub(super) rank: usize,
    seq: Cell<u64>,
    /// Owned by `run_ranks`, which reports how the rank ended (with the panic message), so
    /// dropping it does nothing.
    managed: bool,
}

impl LocalComm {
    /// One communicator per rank, in rank order. `timeout` bounds every wait for peers.
    pub fn group(world_size: usize, timeout: Duration) -> Vec<LocalComm> {
        new_group(world_size, timeout, false)
    }

    /// The collective's identity in errors: advances the sequence number.
    fn start(&self, op: Op, unit: &str) -> Ticket {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        Ticket { op, seq, unit: unit.to_string(), rank: self.rank }
    }

    /// Deposits this rank's call and contribution in its slot; fails at once when the group
    /// has already failed or a peer called something else.
    fn deposit<T: Element>(
        &self,
        ticket: Ticket,
        len: usize,
        root: usize,
        data: Option<Vec<T>>,
    ) -> Result<Claim, CommError> {
        let n = self.shared.world_size;
        let mut state = self.shared.lock().ok_or_else(|| ticket.error(CommErrorKind::Poisoned))?;
        let slot = state.slots.entry(ticket.seq).or_insert_with(|| Slot {
            calls: vec![None; n],
            data: vec![None; n],
            released: vec![false; n],
        });
        let call =
            Call { op: ticket.op, unit: ticket.unit.clone(), len, elem: type_name::<T>(), root };
        slot.calls[self.rank] = Some(call);
        slot.data[self.rank] = data.map(|d| Arc::new(d) as Data);
        let claim = Claim { shared: self.shared.clone(), ticket };
        let progress = check(&state, &claim.ticket);
        drop(state);
        self.shared.changed.notify_all();
        match progress {
            Progress::Failed(kind) => Err(claim.ticket.error(kind)),
            _ => Ok(claim),
        }
    }

    /// Deposits and waits for every peer: the contributions of all ranks, in rank order.
    fn exchange<T: Element>(
        &self,
        ticket: Ticket,
        len: usize,
        root: usize,
        data: Option<Vec<T>>,
    ) -> Result<(Ticket, Vec<Option<Data>>), CommError> {
        self.deposit(ticket, len, root, data)?.wait()
    }
}

pub(super) fn new_group(world_size: usize, timeout: Duration, managed: bool) -> Vec<LocalComm> {
    let shared = Arc::new(Shared {
        world_size,
        timeout,
        state: Mutex::new(State {
            slots: HashMap::new(),
            failures: Vec::new(),
            departed: vec![false; world_size],
        }),
        changed: Condvar::new(),
    });
    (0..world_size)
        .map(|rank| LocalComm { shared: shared.clone(), rank, seq: Cell::new(0), managed })
        .collect()
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if self.managed {
            return;
        }
        if thread::panicking() {
            self.shared.fail(self.rank, "panicked");
        } else {
            self.shared.depart(self.rank);
        }
    }
}

impl fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalComm {{ rank: {}, world_size: {} }}", self.rank, self.shared.world_size)
    }
}

/// Names one collective call in errors.
#[derive(Debug, Clone)]
struct Ticket {
    op: Op,
    seq: u64,
    unit: String,
    rank: usize,
}

impl Ticket {
    fn error(&self, kind: CommErrorKind) -> CommError {
        CommError::new(self.op, self.seq, &self.unit, self.rank, kind)
    }

    fn bad(&self, what: String) -> CommError {
        self.error(CommErrorKind::BadArgument(what))
    }
}

enum Progress {
    Ready(Vec<Option<Data>>),
    Waiting(Vec<usize>),
    Failed(CommErrorKind),
}

/// Where the ticket's slot stands: a peer's mismatched call, then complete (every rank has
/// contributed, so the result is sound even if a rank failed since), then a failed rank, then a
/// departed rank that has not contributed.
fn check(state: &State, ticket: &Ticket) -> Progress {
    let Some(slot) = state.slots.get(&ticket.seq) else {
        return Progress::Failed(CommErrorKind::BadArgument("its slot vanished".into()));
    };
    let Some(mine) = slot.calls.get(ticket.rank).and_then(|c| c.as_ref()) else {
        return Progress::Failed(CommErrorKind::BadArgument("its call vanished".into()));
    };
    for (rank, other) in slot.calls.iter().enumerate() {
        let Some(other) = other.as_ref().filter(|_| rank != ticket.rank) else { continue };
        if let Some(kind) = mismatch(mine, rank, other) {
            return Progress::Failed(kind);
        }
    }
    let missing: Vec<usize> = (0..slot.calls.len()).filter(|&r| slot.calls[r].is_none()).collect();
    if missing.is_empty() {
        return Progress::Ready(slot.data.clone());
    }
    if let Some((rank, reason)) = state.failures.first() {
        return Progress::Failed(CommErrorKind::RankFailed { rank: *rank, reason: reason.clone() });
    }
    match missing.iter().find(|&&r| state.departed.get(r).copied().unwrap_or(false)) {
        Some(&rank) => Progress::Failed(CommErrorKind::RankLeft { rank }),
        None => Progress::Waiting(missing),
    }
}

fn mismatch(mine: &Call, rank: usize, other: &Call) -> Option<CommErrorKind> {
    if mine.op != other.op || mine.unit != other.unit {
        let (op, unit) = (other.op, other.unit.clone());
        Some(CommErrorKind::OpMismatch { rank, op, unit })
    } else if mine.elem != other.elem {
        Some(CommErrorKind::TypeMismatch { elem: mine.elem, rank, other_elem: other.elem })
    } else if mine.len != other.len {
        Some(CommErrorKind::LengthMismatch { len: mine.len, rank, other_len: other.len })
    } else if mine.root != other.root {
        Some(CommErrorKind::RootMismatch { root: mine.root, rank, other_root: other.root })
    } else {
        None
    }
}

/// This rank's stake in a slot: released (and the slot removed by the last rank) when dropped,
/// whether or not it waited.
struct Claim {
    shared: Arc<Shared>,
    ticket: Ticket,
}

impl Claim {
    /// Waits until every rank has deposited, a peer failed or left, or the timeout passed.
    fn wait(self) -> Result<(Ticket, Vec<Option<Data>>), CommError> {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.timeout;
        let poisoned = || self.ticket.error(CommErrorKind::Poisoned);
        let mut state = shared.lock().ok_or_else(poisoned)?;
        let outcome = loop {
            let missing = match check(&state, &self.ticket) {
                Progress::Ready(data) => break Ok((self.ticket.clone(), data)),
                Progress::Failed(kind) => break Err(self.ticket.error(kind)),
                Progress::Waiting(missing) => missing,
            };
            let now = Instant::now();
            if now >= deadline {
                let after = shared.timeout;
                break Err(self.ticket.error(CommErrorKind::TimedOut { after, missing }));
            }
            state = shared.changed.wait_timeout(state, deadline - now).map_err(|_| poisoned())?.0;
        };
        drop(state); // before `self` is dropped: releasing the claim takes the lock
        outcome
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(mut state) = self.shared.lock() else { return };
        let seq = self.ticket.seq;
        let done = match state.slots.get_mut(&seq) {
            Some(slot) => {
                slot.released[self.ticket.rank] = true;
                slot.released.iter().all(|&r| r)
            }
            None => false,
        };
        if done {
            state.slots.remove(&seq);
        }
    }
}

/// The contributions as `&[T]`, in rank order.
fn parts<'a, T: Element>(t: &Ticket, data: &'a [Option<Data>]) -> Result<Vec<&'a [T]>, CommError> {
    let mut out = Vec::with_capacity(data.len());
    for (rank, d) in data.iter().enumerate() {
        match d.as_ref().and_then(|d| d.downcast_ref::<Vec<T>>()) {
            Some(v) => out.push(v.as_slice()),
            None => return Err(t.bad(format!("rank {rank} contributed no {}", type_name::<T>()))),
        }
    }
    Ok(out)
}

/// `out` = sum over ranks of `parts[q][range]`, added in rank order starting from rank 0's value.
fn sum_in_rank_order<T: Summable>(
    t: &Ticket,
    parts: &[&[T]],
    start: usize,
    out: &mut [T],
) -> Result<(), CommError> {
    for (q, part) in parts.iter().enumerate() {
        let Some(src) = part.get(start..start + out.len()) else {
            return Err(t.bad(format!("rank {q}'s buffer is too short ({})", part.len())));
        };
        if q == 0 {
            out.copy_from_slice(src);
        } else {
            out.iter_mut().zip(src).for_each(|(o, x)| *o += *x);
        }
    }
    Ok(())
}

/// Rank order concatenation of equal-length shards.
fn concat<T: Element>(parts: &[&[T]], full: &mut [T]) {
    let n = parts.first().map_or(0, |p| p.len());
    for (q, part) in parts.iter().enumerate() {
        if let Some(dst) = full.get_mut(q * n..(q + 1) * n) {
            dst.copy_from_slice(part);
        }
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn next_seq(&self) -> u64 {
        self.seq.get()
    }

    fn abort(&self, reason: &str) {
        self.shared.fail(self.rank, reason);
    }

    fn all_reduce_sum<T: Summable>(&self, buf: &mut [T], unit: &str) -> Result<(), CommError> {
        let t = self.start(Op::AllReduceSum, unit);
        let (t, data) = self.exchange(t, buf.len(), 0, Some(buf.to_vec()))?;
        sum_in_rank_order(&t, &parts::<T>(&t, &data)?, 0, buf)
    }

    fn reduce_scatter_sum<T: Summable>(
        &self,
        input: &[T],
        output: &mut [T],
        unit: &str,
    ) -> Result<(), CommError> {
        let t = self.start(Op::ReduceScatterSum, unit);
        let n = self.shared.world_size;
        if input.len() != n * output.len() {
            let (i, o) = (input.len(), output.len());
            return Err(
                t.bad(format!("input length {i} is not world_size {n} x output length {o}"))
            );
        }
        let (t, data) = self.exchange(t, input.len(), 0, Some(input.to_vec()))?;
        sum_in_rank_order(&t, &parts::<T>(&t, &data)?, self.rank * output.len(), output)
    }

    fn all_gather<T: Element>(
        &self,
        shard: &[T],
        full: &mut [T],
        unit: &str,
    ) -> Result<(), CommError> {
        let t = self.start(Op::AllGather, unit);
        let n = self.shared.world_size;
        if full.len() != n * shard.len() {
            let (f, s) = (full.len(), shard.len());
            return Err(t.bad(format!("full length {f} is not world_size {n} x shard length {s}")));
        }
        let (t, data) = self.exchange(t, shard.len(), 0, Some(shard.to_vec()))?;
        concat(&parts::<T>(&t, &data)?, full);
        Ok(())
    }

    fn broadcast<T: Element>(
        &self,
        buf: &mut [T],
        root: usize,
        unit: &str,
    ) -> Result<(), CommError> {
        let t = self.start(Op::Broadcast, unit);
        let n = self.shared.world_size;
        if root >= n {
            return Err(t.bad(format!("root {root} is not a rank of a group of {n}")));
        }
        let mine = (self.rank == root).then(|| buf.to_vec());
        let (t, data) = self.exchange(t, buf.len(), root, mine)?;
        if self.rank != root {
            let from_root = data.get(root).and_then(|d| d.as_ref());
            match from_root.and_then(|d| d.downcast_ref::<Vec<T>>()) {
                Some(v) if v.len() == buf.len() => buf.copy_from_slice(v),
                _ => return Err(t.bad(format!("root {root} contributed no matching buffer"))),
            }
        }
        Ok(())
    }

    fn barrier(&self, unit: &str) -> Result<(), CommError> {
        let t = self.start(Op::Barrier, unit);
        self.exchange::<u32>(t, 0, 0, None).map(|_| ())
    }

    fn all_gather_async<T: Element>(
        &self,
        shard: Vec<T>,
        unit: &str,
    ) -> Result<Pending<T>, CommError> {
        let t = self.start(Op::AllGather, unit);
        let len = shard.len() * self.shared.world_size;
        let claim = self.deposit(t, shard.len(), 0, Some(shard))?;
        Ok(Pending::new(move || {
            let (t, data) = claim.wait()?;
            let mut full = vec![T::default(); len];
            concat(&parts::<T>(&t, &data)?, &mut full);
            Ok(full)
        }))
    }

    fn reduce_scatter_sum_async<T: Summable>(
        &self,
        input: Vec<T>,
        unit: &str,
    ) -> Result<Pending<T>, CommError> {
        let t = self.start(Op::ReduceScatterSum, unit);
        let n = self.shared.world_size;
        if n == 0 || !input.len().is_multiple_of(n) {
            let i = input.len();
            return Err(t.bad(format!("input length {i} is not a multiple of world_size {n}")));
        }
        let (len, start) = (input.len() / n, self.rank * input.len() / n);
        let claim = self.deposit(t, input.len(), 0, Some(input))?;
        Ok(Pending::new(move || {
            let (t, data) = claim.wait()?;
            let mut shard = vec![T::default(); len];
            sum_in_rank_order(&t, &parts::<T>(&t, &data)?, start, &mut shard)?;
            Ok(shard)
        }))
    }
}
