//! The communication layer on `LocalComm`: every collective against a direct computation at world
//! sizes 1-4, bitwise rank-order reductions whatever the arrival order, asynchronous overlap,
//! sequence numbers, and failures (timeout, error, panic, mismatch, departure) that name the op,
//! its sequence number, the unit and the ranks, and arrive fast.

use half::bf16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};
use zero_candle::comm::{run_ranks, Comm, CommError, LocalComm, RankError};

/// Timeout for tests that must not depend on it: far longer than any test takes.
const LONG: Duration = Duration::from_secs(30);
/// Elements per rank: odd, so no length is a lucky power of two.
const PER_RANK: usize = 7;

/// Fixed-seed generator (Knuth's MMIX LCG), so every rank and the reference agree on values.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Values over nine decades with random signs: adding them in another order changes bits.
    fn wide(&mut self) -> f32 {
        let unit = self.next_u32() as f32 / (1u64 << 31) as f32 - 0.5;
        unit * 10f32.powi((self.next_u32() % 9) as i32 - 4)
    }
}

fn wide_values(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = Lcg::new(seed);
    (0..len).map(|_| rng.wide()).collect()
}

/// Exact small values (multiples of 1/4) for the correctness tests.
fn exact_values(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 100 + i) as f32 * 0.25 + 0.5).collect()
}

/// ((x0 + x1) + x2) + ...: the sum every rank must reproduce bitwise.
fn rank_order_sum(per_rank: &[Vec<f32>]) -> Vec<f32> {
    let mut sum = per_rank[0].clone();
    for part in &per_rank[1..] {
        sum.iter_mut().zip(part).for_each(|(s, x)| *s += *x);
    }
    sum
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn all_reduce_sum_matches_direct_sum_at_worlds_1_to_4() {
    for world in 1..=4 {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| exact_values(r, PER_RANK)).collect();
        let expected = rank_order_sum(&inputs);
        let results = run_ranks(world, LONG, |comm| -> Result<_, CommError> {
            let mut buf = inputs[comm.rank()].clone();
            comm.all_reduce_sum(&mut buf, "root")?;
            let mut buf64: Vec<f64> = inputs[comm.rank()].iter().map(|&x| x as f64).collect();
            comm.all_reduce_sum(&mut buf64, "root")?;
            Ok((buf, buf64))
        })
        .unwrap();
        for (rank, (buf, buf64)) in results.iter().enumerate() {
            assert_eq!(buf, &expected, "world {world} rank {rank}");
            let expected64: Vec<f64> = expected.iter().map(|&x| x as f64).collect();
            assert_eq!(buf64, &expected64, "world {world} rank {rank} f64");
        }
        // At world 2, element 0 is 0.5 + 25.5.
        if world == 2 {
            assert_eq!(expected[0], 26.0);
        }
    }
}

#[test]
fn reduce_scatter_sum_gives_each_rank_its_summed_chunk_at_worlds_1_to_4() {
    for world in 1..=4 {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| exact_values(r, world * PER_RANK)).collect();
        let sum = rank_order_sum(&inputs);
        let results = run_ranks(world, LONG, |comm| -> Result<_, CommError> {
            let mut out = vec![f32::NAN; PER_RANK];
            comm.reduce_scatter_sum(&inputs[comm.rank()], &mut out, "block.0")?;
            let pending = comm.reduce_scatter_sum_async(inputs[comm.rank()].clone(), "block.1")?;
            Ok((out, pending.wait()?))
        })
        .unwrap();
        for (rank, (out, out_async)) in results.iter().enumerate() {
            let chunk = &sum[rank * PER_RANK..(rank + 1) * PER_RANK];
            assert_eq!(out.as_slice(), chunk, "world {world} rank {rank}");
            assert_eq!(out_async.as_slice(), chunk, "world {world} rank {rank} async");
        }
    }
}

#[test]
fn all_gather_concatenates_shards_in_rank_order_at_worlds_1_to_4() {
    for world in 1..=4 {
        let shards: Vec<Vec<f32>> = (0..world).map(|r| exact_values(r, PER_RANK)).collect();
        let expected: Vec<f32> = shards.concat();
        let results = run_ranks(world, LONG, |comm| -> Result<_, CommError> {
            let shard = &shards[comm.rank()];
            let mut full = vec![0f32; world * PER_RANK];
            comm.all_gather(shard, &mut full, "block.2")?;
            let shard16: Vec<bf16> = shard.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut full16 = vec![bf16::ZERO; world * PER_RANK];
            comm.all_gather(&shard16, &mut full16, "block.2")?;
            let ids: Vec<u16> = (0..PER_RANK).map(|i| (comm.rank() * 10 + i) as u16).collect();
            let ids_full = comm.all_gather_async(ids, "block.2")?.wait()?;
            Ok((full, full16, ids_full))
        })
        .unwrap();
        let expected16: Vec<bf16> = expected.iter().map(|&x| bf16::from_f32(x)).collect();
        let expected_ids: Vec<u16> =
            (0..world).flat_map(|r| (0..PER_RANK).map(move |i| (r * 10 + i) as u16)).collect();
        for (rank, (full, full16, ids_full)) in results.iter().enumerate() {
            assert_eq!(full, &expected, "world {world} rank {rank}");
            assert_eq!(full16, &expected16, "world {world} rank {rank} bf16");
            assert_eq!(ids_full, &expected_ids, "world {world} rank {rank} u16 async");
        }
    }
}

#[test]
fn broadcast_copies_the_root_buffer_to_every_rank_at_worlds_1_to_4() {
    for world in 1..=4 {
        for root in 0..world {
            let results = run_ranks(world, LONG, |comm| -> Result<_, CommError> {
                let mut buf = exact_values(comm.rank(), PER_RANK);
                comm.broadcast(&mut buf, root, "root")?;
                Ok(buf)
            })
            .unwrap();
            for (rank, buf) in results.iter().enumerate() {
                assert_eq!(
                    buf,
                    &exact_values(root, PER_RANK),
                    "world {world} root {root} rank {rank}"
                );
            }
        }
    }
}

#[test]
fn barrier_returns_only_after_every_rank_has_entered_at_worlds_1_to_4() {
    for world in 1..=4 {
        let entered = AtomicUsize::new(0);
        let seen = run_ranks(world, LONG, |comm| -> Result<_, CommError> {
            thread::sleep(Duration::from_millis(10 * comm.rank() as u64));
            entered.fetch_add(1, Ordering::SeqCst);
            comm.barrier("checkpoint")?;
            Ok(entered.load(Ordering::SeqCst))
        })
        .unwrap();
        assert_eq!(seen, vec![world; world]);
    }
}

#[test]
fn world_one_reduction_is_the_input_bitwise() {
    let input = vec![-0.0f32, 1e-45, f32::MAX, -3.5, 0.1, 1e30, -1e-30];
    let out = run_ranks(1, LONG, |comm| -> Result<_, CommError> {
        let mut buf = input.clone();
        comm.all_reduce_sum(&mut buf, "root")?;
        let mut shard = vec![0f32; input.len()];
        comm.reduce_scatter_sum(&input, &mut shard, "root")?;
        Ok((buf, shard))
    })
    .unwrap();
    assert_eq!(bits(&out[0].0), bits(&input));
    assert_eq!(bits(&out[0].1), bits(&input));
}

#[test]
fn reductions_are_bitwise_rank_order_sums_whatever_the_arrival_order() {
    const WORLD: usize = 4;
    const ROUNDS: u64 = 20;
    let len = WORLD * PER_RANK;
    let inputs = |round: u64| -> Vec<Vec<f32>> {
        (0..WORLD).map(|r| wide_values(round * 31 + r as u64, len)).collect()
    };
    let results = run_ranks(WORLD, LONG, |comm| -> Result<_, CommError> {
        let mut sleeps = Lcg::new(1000 + comm.rank() as u64);
        let mut out = Vec::new();
        for round in 0..ROUNDS {
            let mine = inputs(round)[comm.rank()].clone();
            thread::sleep(Duration::from_micros((sleeps.next_u32() % 3000) as u64));
            let mut buf = mine.clone();
            comm.all_reduce_sum(&mut buf, "root")?;
            thread::sleep(Duration::from_micros((sleeps.next_u32() % 3000) as u64));
            let mut shard = vec![0f32; PER_RANK];
            comm.reduce_scatter_sum(&mine, &mut shard, "block.0")?;
            out.push((buf, shard));
        }
        Ok(out)
    })
    .unwrap();
    let mut order_sensitive = 0;
    for round in 0..ROUNDS {
        let per_rank = inputs(round);
        let expected = rank_order_sum(&per_rank);
        let reversed: Vec<Vec<f32>> = per_rank.iter().rev().cloned().collect();
        order_sensitive += bits(&expected)
            .iter()
            .zip(bits(&rank_order_sum(&reversed)))
            .filter(|(a, b)| **a != *b)
            .count();
        for (rank, rounds) in results.iter().enumerate() {
            let (buf, shard) = &rounds[round as usize];
            assert_eq!(bits(buf), bits(&expected), "round {round} rank {rank}");
            let chunk = &expected[rank * PER_RANK..(rank + 1) * PER_RANK];
            assert_eq!(bits(shard), bits(chunk), "round {round} rank {rank} shard");
        }
    }
    // The values are chosen so that the order of addition changes bits: the test has teeth.
    assert!(order_sensitive > 20, "only {order_sensitive} elements depend on the order");
}

#[test]
fn async_gather_deposits_at_call_time_so_peers_finish_while_this_rank_computes() {
    const WORLD: usize = 3;
    let peers_done = AtomicUsize::new(0);
    let results = run_ranks(WORLD, LONG, |comm| -> Result<_, CommError> {
        let rank = comm.rank();
        let shard = exact_values(rank, PER_RANK);
        if rank == 0 {
            // Prefetch blocks 0 and 1, then "compute" until both peers have finished gathering
            // block 0 with rank 0's contribution: only possible if it was deposited at call time.
            let block0 = comm.all_gather_async(shard.clone(), "block.0")?;
            let block1 = comm.all_gather_async(shard.iter().map(|x| -x).collect(), "block.1")?;
            let start = Instant::now();
            let mut work = 0f64;
            loop {
                work += (0..1000).map(|i| (i as f64).sqrt()).sum::<f64>();
                if peers_done.load(Ordering::SeqCst) == WORLD - 1 {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "peers never finished");
            }
            assert!(work > 21_000.0); // sum of sqrt(i), i < 1000, is about 21065
            let full1 = block1.wait()?; // waited out of order
            let full0 = block0.wait()?;
            Ok((full0, full1))
        } else {
            let mut full0 = vec![0f32; WORLD * PER_RANK];
            comm.all_gather(&shard, &mut full0, "block.0")?;
            peers_done.fetch_add(1, Ordering::SeqCst);
            let neg: Vec<f32> = shard.iter().map(|x| -x).collect();
            let mut full1 = vec![0f32; WORLD * PER_RANK];
            comm.all_gather(&neg, &mut full1, "block.1")?;
            Ok((full0, full1))
        }
    })
    .unwrap();
    let expected0: Vec<f32> = (0..WORLD).flat_map(|r| exact_values(r, PER_RANK)).collect();
    let expected1: Vec<f32> = expected0.iter().map(|x| -x).collect();
    for (rank, (full0, full1)) in results.iter().enumerate() {
        assert_eq!(full0, &expected0, "rank {rank} block 0");
        assert_eq!(full1, &expected1, "rank {rank} block 1");
    }
}

#[test]
fn sequence_numbers_advance_identically_on_every_rank() {
    let seqs = run_ranks(3, LONG, |comm| -> Result<_, CommError> {
        let mut seen = vec![comm.next_seq()];
        let mut buf = vec![1f32; 6];
        comm.all_reduce_sum(&mut buf, "root")?;
        seen.push(comm.next_seq());
        let pending = comm.all_gather_async(vec![2u32; 2], "block.0")?;
        seen.push(comm.next_seq()); // counted when issued, not when waited
        comm.barrier("root")?;
        seen.push(comm.next_seq());
        pending.wait()?;
        seen.push(comm.next_seq());
        let mut shard = vec![0f32; 2];
        comm.reduce_scatter_sum(&buf, &mut shard, "block.1")?;
        comm.broadcast(&mut buf, 2, "root")?;
        seen.push(comm.next_seq());
        Ok(seen)
    })
    .unwrap();
    assert_eq!(seqs, vec![vec![0, 1, 2, 3, 3, 5]; 3]);
}

#[test]
fn timeout_names_op_seq_unit_rank_and_the_missing_rank_within_twice_the_timeout() {
    let timeout = Duration::from_millis(200);
    let seen = Mutex::new(None);
    let err = run_ranks(2, timeout, |comm| -> Result<(), CommError> {
        comm.barrier("root")?;
        if comm.rank() == 0 {
            thread::sleep(timeout * 3); // skips the gather, but stays in the group
            return Ok(());
        }
        let start = Instant::now();
        let mut full = vec![0f32; 2 * PER_RANK];
        let result = comm.all_gather(&[1f32; PER_RANK], &mut full, "block.3");
        *seen.lock().unwrap() = Some(start.elapsed());
        result
    })
    .unwrap_err();
    let message =
        "all_gather #1 (unit block.3) on rank 1: timed out after 0.2 s waiting for ranks [0]";
    assert_eq!(err, RankError { rank: 1, panicked: false, message: message.to_string() });
    let elapsed = seen.lock().unwrap().unwrap();
    assert!(elapsed >= timeout && elapsed < 2 * timeout, "timed out after {elapsed:?}");
}

#[test]
fn a_rank_returning_err_fails_its_peers_fast_and_is_the_reported_cause() {
    let peer_errors = Mutex::new(Vec::new());
    let start = Instant::now();
    let err = run_ranks(4, LONG, |comm| -> Result<(), String> {
        for step in 0..5 {
            if comm.rank() == 1 && step == 2 {
                thread::sleep(Duration::from_millis(50)); // peers are blocked by now
                return Err("loss is NaN at step 2".to_string());
            }
            if comm.rank() == 3 && step == 2 {
                thread::sleep(Duration::from_millis(200)); // enters after rank 1 failed
            }
            let mut buf = vec![step as f32; PER_RANK];
            if let Err(e) = comm.all_reduce_sum(&mut buf, &format!("block.{step}")) {
                peer_errors.lock().unwrap().push((comm.rank(), e.to_string()));
                return Err(e.to_string());
            }
            assert_eq!(buf, vec![4.0 * step as f32; PER_RANK]);
        }
        Ok(())
    })
    .unwrap_err();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?} with a 30 s timeout");
    let message = "loss is NaN at step 2".to_string();
    assert_eq!(err, RankError { rank: 1, panicked: false, message });
    assert_eq!(err.to_string(), "rank 1 failed: loss is NaN at step 2");
    let mut peer_errors = peer_errors.into_inner().unwrap();
    peer_errors.sort();
    let expected: Vec<(usize, String)> = [0, 2, 3]
        .iter()
        .map(|&r| {
            let m = format!(
                "all_reduce_sum #2 (unit block.2) on rank {r}: rank 1 failed: {}",
                "loss is NaN at step 2"
            );
            (r, m)
        })
        .collect();
    assert_eq!(peer_errors, expected);
}

#[test]
fn a_panicking_rank_is_reported_with_its_message_quickly() {
    let peer_errors = Mutex::new(Vec::new());
    let start = Instant::now();
    let err = run_ranks(3, LONG, |comm| -> Result<(), CommError> {
        comm.barrier("root")?;
        if comm.rank() == 1 {
            panic!("shape mismatch in block 2");
        }
        let result = comm.barrier("block.2");
        if let Err(e) = &result {
            peer_errors.lock().unwrap().push(e.to_string());
        }
        result
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert_eq!(err.to_string(), "rank 1 panicked: shape mismatch in block 2");
    assert!(err.panicked);
    let mut peer_errors = peer_errors.into_inner().unwrap();
    peer_errors.sort();
    assert_eq!(
        peer_errors,
        [0, 2]
            .iter()
            .map(|r| format!(
                "barrier #1 (unit block.2) on rank {r}: rank 1 failed: panicked: shape mismatch in block 2"
            ))
            .collect::<Vec<_>>()
    );
}

#[test]
fn mismatched_ops_at_the_same_sequence_number_fail_every_rank_naming_the_other_call() {
    let errors = Mutex::new(vec![String::new(); 3]);
    let start = Instant::now();
    let err = run_ranks(3, LONG, |comm| -> Result<(), CommError> {
        comm.barrier("root")?;
        let result = if comm.rank() == 2 {
            comm.reduce_scatter_sum(&[1f32; 3], &mut [0f32; 1], "root")
        } else {
            comm.all_gather(&[1f32; 4], &mut [0f32; 12], "block.3")
        };
        if let Err(e) = &result {
            errors.lock().unwrap()[comm.rank()] = e.to_string();
        }
        result
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    let errors = errors.into_inner().unwrap();
    assert_eq!(
        errors[..2],
        [
            "all_gather #1 (unit block.3) on rank 0: rank 2 called reduce_scatter_sum #1 (unit root) instead",
            "all_gather #1 (unit block.3) on rank 1: rank 2 called reduce_scatter_sum #1 (unit root) instead",
        ]
    );
    // Rank 2 names the lowest-numbered rank that had arrived when it looked.
    let rank2 = |r: usize| {
        format!("reduce_scatter_sum #1 (unit root) on rank 2: rank {r} called all_gather #1 (unit block.3) instead")
    };
    assert!(errors[2] == rank2(0) || errors[2] == rank2(1), "{}", errors[2]);
    assert!(errors.contains(&err.message), "root cause {err} is one of the mismatch errors");
}

#[test]
fn mismatched_buffer_lengths_fail_naming_both_lengths() {
    let errors = Mutex::new(vec![String::new(); 2]);
    run_ranks(2, LONG, |comm| -> Result<(), CommError> {
        let mut buf = vec![1f32; if comm.rank() == 0 { 12 } else { 10 }];
        let result = comm.all_reduce_sum(&mut buf, "root");
        if let Err(e) = &result {
            errors.lock().unwrap()[comm.rank()] = e.to_string();
        }
        result
    })
    .unwrap_err();
    assert_eq!(
        errors.into_inner().unwrap(),
        vec![
            "all_reduce_sum #0 (unit root) on rank 0: buffer length 12 differs from rank 1's 10",
            "all_reduce_sum #0 (unit root) on rank 1: buffer length 10 differs from rank 0's 12",
        ]
    );
}

#[test]
fn a_comm_dropped_normally_fails_peers_that_need_it_at_once() {
    let mut comms = LocalComm::group(2, LONG);
    let (comm1, comm0) = (comms.pop().unwrap(), comms.pop().unwrap());
    let start = Instant::now();
    let err = thread::scope(|s| {
        s.spawn(move || drop(comm1));
        s.spawn(move || comm0.barrier("root")).join().unwrap().unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(err.to_string(), "barrier #0 (unit root) on rank 0: rank 1 has left the group");
}

#[test]
fn a_comm_dropped_while_its_thread_panics_aborts_with_panicked() {
    let mut comms = LocalComm::group(2, LONG);
    let (comm1, comm0) = (comms.pop().unwrap(), comms.pop().unwrap());
    let start = Instant::now();
    let (err, joined) = thread::scope(|s| {
        let rank1 = s.spawn(move || {
            let _comm = comm1;
            thread::sleep(Duration::from_millis(50));
            panic!("out of memory");
        });
        let err = s.spawn(move || comm0.all_reduce_sum(&mut [1f32; 3], "block.0")).join().unwrap();
        (err.unwrap_err(), rank1.join())
    });
    assert!(joined.is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        "all_reduce_sum #0 (unit block.0) on rank 0: rank 1 failed: panicked"
    );
}

#[test]
fn abort_fails_a_peer_blocked_in_a_collective_at_once() {
    let mut comms = LocalComm::group(2, LONG);
    let (comm1, comm0) = (comms.pop().unwrap(), comms.pop().unwrap());
    let start = Instant::now();
    let err = thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(50));
            comm1.abort("disk full while saving step 500");
        });
        s.spawn(move || comm0.broadcast(&mut [0u32; 5], 1, "root")).join().unwrap().unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        "broadcast #0 (unit root) on rank 0: rank 1 failed: disk full while saving step 500"
    );
}

#[test]
fn inconsistent_buffer_sizes_on_one_rank_are_reported_without_waiting() {
    let comms = LocalComm::group(2, LONG);
    let comm = &comms[0];
    let err = comm.reduce_scatter_sum(&[1f32; 7], &mut [0f32; 3], "block.1").unwrap_err();
    assert_eq!(
        err.to_string(),
        "reduce_scatter_sum #0 (unit block.1) on rank 0: input length 7 is not world_size 2 x output length 3"
    );
    let err = comm.all_gather(&[1f32; 3], &mut [0f32; 5], "block.1").unwrap_err();
    assert_eq!(
        err.to_string(),
        "all_gather #1 (unit block.1) on rank 0: full length 5 is not world_size 2 x shard length 3"
    );
    let err = comm.broadcast(&mut [0f32; 3], 2, "root").unwrap_err();
    assert_eq!(
        err.to_string(),
        "broadcast #2 (unit root) on rank 0: root 2 is not a rank of a group of 2"
    );
    let err = comm.reduce_scatter_sum_async(vec![1f32; 7], "block.1").unwrap_err();
    assert_eq!(
        err.to_string(),
        "reduce_scatter_sum #3 (unit block.1) on rank 0: input length 7 is not a multiple of world_size 2"
    );
}
