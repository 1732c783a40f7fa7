//! The engine's table across processes, as nginx workers use it: forked
//! processes share one mapping, count into the same keys and make new ones
//! at once, and some are killed with SIGKILL at arbitrary points, mid-insert
//! and mid-add included. Afterwards:
//!
//! - every add a process reported done is in the totals, and no add is
//!   counted twice: for each key, total - done is between 0 and the number
//!   of processes killed (each may have had one add in flight, which may or
//!   may not have landed: the same as a request killed mid-log);
//! - keys only survivors wrote are exact, their churned keys (made,
//!   counted, removed, made again: records removed and reused all the
//!   while, by every process, in several sizes) included;
//! - the table is whole: every published record is a key some process
//!   made, found again by lookup, and listed once; the churn ran on far
//!   more records than the region holds, in reused space.
//!
//! The processes take the table lock as nginx's workers do (their pid,
//! `kill(pid, 0)`), on a clock whose "seconds" are milliseconds, so that
//! removed records come back after 10 ms.
//!
//! One test in this file: fork() is only safe with no other test threads
//! running, and the children touch no allocator (keys are made before).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

mod common;
use common::{assert_ended, record_of, shared_words, Worker};

use resty_counter_core::engine::cell::{add_i64, load_i64};
use resty_counter_core::engine::table::Table;
use resty_counter_core::engine::Error;

const PROCESSES: usize = 6;
const SHARED_KEYS: usize = 16;
const OWN_KEYS: usize = 400;
const OPS: u64 = 300_000;
const RACE_KEYS: usize = 2000;
const CHURN_KEYS: usize = 200;
const REGION_WORDS: usize = 1 << 17;

fn shared_key(i: usize) -> Vec<u8> {
    format!("shared-{}", i).into_bytes()
}

fn own_key(process: usize, i: usize) -> Vec<u8> {
    // Lengths vary so records of many sizes interleave in the arena.
    format!("own-{}-{}-{}", process, i, "x".repeat(i % 23)).into_bytes()
}

fn race_key(i: usize) -> Vec<u8> {
    format!("race-{}", i).into_bytes()
}

fn churn_key(process: usize, i: usize) -> Vec<u8> {
    format!("churn-{}-{}", process, i).into_bytes()
}

/// Churned keys' records have widths 1 to 3: three sizes of free list.
fn churn_width(i: usize) -> u32 {
    1 + (i % 3) as u32
}

/// This process as an nginx worker, on a clock in milliseconds (the 10 s
/// grace period lasts 10 ms).
const WORKER: Worker = Worker { ms_clock: true };

/// A child's life: once every process is ready, all make the same new keys
/// in the same order (insert races on every one), then OPS adds on shared
/// keys, on its own keys, which it makes as it goes, and on its churned
/// keys, one in 8 of whose adds is followed by the key's removal. `done`
/// gets one word per key: adds completed (since the last removal, for a
/// churned key).
fn child(
    table: &Table<AtomicU64>,
    process: usize,
    keys: &[Vec<u8>],
    race_keys: &[Vec<u8>],
    start: &AtomicU64,
    done: &[AtomicU64],
) -> ! {
    start.fetch_add(1, Relaxed);
    while start.load(Relaxed) < PROCESSES as u64 {
        std::hint::spin_loop();
    }
    for key in race_keys {
        if add_i64(&record_of(table, key, 2, &WORKER).cells()[0], 1).is_err() {
            unsafe { libc::_exit(5) }
        }
    }
    let churn = SHARED_KEYS + OWN_KEYS;
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (process as u64 + 1);
    for _ in 0..OPS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = match state % 3 {
            0 => (state >> 8) as usize % SHARED_KEYS,
            1 => SHARED_KEYS + (state >> 8) as usize % OWN_KEYS,
            _ => churn + (state >> 8) as usize % CHURN_KEYS,
        };
        let width = if key < churn {
            2
        } else {
            churn_width(key - churn)
        };
        if add_i64(&record_of(table, &keys[key], width, &WORKER).cells()[0], 1).is_err() {
            unsafe { libc::_exit(4) }
        }
        done[key].fetch_add(1, Relaxed);
        if key >= churn && (state >> 4) % 8 == 0 {
            loop {
                match table.remove_if(&keys[key], &WORKER, |_| true) {
                    Ok(true) => break,
                    Err(Error::Busy) => continue,
                    _ => unsafe { libc::_exit(6) },
                }
            }
            done[key].store(0, Relaxed);
        }
    }
    // Done, but not gone before the parent's kills are over: a process to
    // be killed that finished first (its parent descheduled on a busy
    // machine) would end the test with nothing to check.
    while start.load(Relaxed) <= PROCESSES as u64 {
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    unsafe { libc::_exit(0) }
}

#[test]
fn processes_killed_mid_write_lose_nothing_done_and_corrupt_nothing() {
    let table = Table::init(shared_words(REGION_WORDS), [7, 11], 0).unwrap();
    // Per process, its keys: the shared ones, then its own.
    let keys: Vec<Vec<Vec<u8>>> = (0..PROCESSES)
        .map(|p| {
            (0..SHARED_KEYS)
                .map(shared_key)
                .chain((0..OWN_KEYS).map(|i| own_key(p, i)))
                .chain((0..CHURN_KEYS).map(|i| churn_key(p, i)))
                .collect()
        })
        .collect();
    let race_keys: Vec<Vec<u8>> = (0..RACE_KEYS).map(race_key).collect();
    let start = &shared_words(1)[0];
    let done: Vec<&[AtomicU64]> = (0..PROCESSES)
        .map(|_| shared_words(SHARED_KEYS + OWN_KEYS + CHURN_KEYS))
        .collect();

    let mut pids = Vec::new();
    for (process, (keys, done)) in keys.iter().zip(&done).enumerate() {
        match unsafe { libc::fork() } {
            0 => child(&table, process, keys, &race_keys, start, done),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    // Kill every other process mid-run, each at another point of its run
    // (measured by its own progress, so that no kill comes too late).
    let mut killed = HashSet::new();
    for (process, &pid) in pids.iter().enumerate() {
        if process % 2 == 1 {
            let at = OPS * process as u64 / (2 * PROCESSES as u64);
            // Its shared and own keys' adds only: a churned key's go back
            // to 0 at its removal.
            while done[process][..SHARED_KEYS + OWN_KEYS]
                .iter()
                .map(|d| d.load(Relaxed))
                .sum::<u64>()
                < at
            {
                let mut status = 0;
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    panic!("process {} failed before its kill: {}", process, status);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // Reaped at once, as nginx's master does: a zombie would look
            // alive to kill(pid, 0), and hold the table lock if it died
            // under it.
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_ended(process, status, true);
            killed.insert(process);
        }
    }
    start.fetch_add(1, Relaxed);
    for (process, &pid) in pids.iter().enumerate() {
        if killed.contains(&process) {
            continue;
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_ended(process, status, killed.contains(&process));
    }

    let total_of = |key: &[u8]| table.lookup(key).map_or(0, |r| load_i64(&r.cells()[0]));
    let killed_count = killed.len() as i64;

    for i in 0..SHARED_KEYS {
        let done_sum: u64 = done.iter().map(|d| d[i].load(Relaxed)).sum();
        let in_flight = total_of(&shared_key(i)) - done_sum as i64;
        assert!(
            (0..=killed_count).contains(&in_flight),
            "shared key {}: {} counted beyond {} done",
            i,
            in_flight,
            done_sum
        );
    }
    let mut made = HashSet::new();
    for (process, done) in done.iter().enumerate() {
        for i in 0..OWN_KEYS {
            let key = own_key(process, i);
            let done = done[SHARED_KEYS + i].load(Relaxed) as i64;
            let total = total_of(&key);
            if killed.contains(&process) {
                assert!(
                    (0..=1).contains(&(total - done)),
                    "{:?}: {} vs {}",
                    key,
                    total,
                    done
                );
            } else {
                assert_eq!(total, done, "{:?}", String::from_utf8_lossy(&key));
            }
            made.insert(key);
        }
        for i in 0..CHURN_KEYS {
            let key = churn_key(process, i);
            if !killed.contains(&process) {
                let done = done[SHARED_KEYS + OWN_KEYS + i].load(Relaxed) as i64;
                assert_eq!(total_of(&key), done, "{:?}", String::from_utf8_lossy(&key));
            }
            made.insert(key);
        }
    }
    made.extend((0..SHARED_KEYS).map(shared_key));
    // Every process made every race key before any kill: one record each,
    // counted once per process.
    for key in &race_keys {
        assert_eq!(
            total_of(key),
            PROCESSES as i64,
            "{:?}",
            String::from_utf8_lossy(key)
        );
    }
    made.extend(race_keys.iter().cloned());

    // The table is whole: every record is a key that was made, once.
    let mut listed = HashSet::new();
    let mut key = Vec::new();
    for record in table.records() {
        key.clear();
        record.key_into(&mut key);
        assert!(
            made.contains(&key),
            "a record with a key nobody made: {:?}",
            key
        );
        assert_eq!(table.lookup(&key).unwrap().offset(), record.offset());
        assert!(listed.insert(key.clone()), "listed twice: {:?}", key);
    }
    let survivors_keys = (PROCESSES - killed.len()) * OWN_KEYS + SHARED_KEYS + RACE_KEYS;
    let stats = table.stats();
    // The churn removed twice the words the arena holds (a churned record
    // takes 5 words at least), and made most of its records in reused
    // space: without reuse it would have run out.
    assert!(
        stats.removed * 5 > 2 * stats.arena_total && stats.reused > stats.removed / 2,
        "{:?}",
        stats
    );
    assert!(stats.arena_used < stats.arena_total, "{:?}", stats);
    assert!(
        listed.len() >= survivors_keys,
        "{} keys listed",
        listed.len()
    );
    // A killed process may have died under the table lock between
    // publishing a record and counting it, or the other way round for a
    // removal: the count is off by one per kill at most, nothing else.
    assert_eq!(stats.refused, 0);
    let records = stats.records as usize;
    assert!(
        (listed.len().saturating_sub(killed.len())..=listed.len() + killed.len())
            .contains(&records),
        "{} records counted, {} listed",
        records,
        listed.len()
    );
    // A new key still goes in, as a worker of nginx makes it: a process
    // killed under the table lock after the survivors' last new key left
    // it held, and only an owner that asks the kernel (not the table's
    // default owner, whose holders are threads never taken for dead) takes
    // it over.
    assert_eq!(
        table
            .get_or_insert_by(b"after", 2, &WORKER)
            .map(|(_, made)| made),
        Ok(true)
    );
}
