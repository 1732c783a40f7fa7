//! Strict records removed across processes, as nginx workers remove them:
//! forked processes add to one key through the cells they keep (looked up
//! again when the table's epoch moves, as the Lua side does), one deletes
//! the key again and again and removes its record, and two sweep it
//! (GONE outside the table lock first, then the removal under it: the
//! state a sweeper killed halfway leaves). One adder and both sweepers are
//! killed with SIGKILL mid-run. Afterwards what the deletes took plus the
//! key's value is every add reported done, plus at most one in flight per
//! killed adder: an add that landed in a removed record would be missing.
//!
//! One test in this file: fork() is only safe with no other test threads
//! running.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod common;
use common::{kill_every_other, shared_words};

use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::strict::{self, AtomicPair, Change, Current, Pair, Refused};
use resty_counter_core::engine::table::{Process, Record, Table};

const PROCESSES: usize = 6;
const OPS: u64 = 300_000;
/// At most this many deletes (each removal leaves a record's room unused
/// for the grace period: the region holds them all).
const DELETES: u64 = 100_000;
const REGION_WORDS: usize = 1 << 22;
const KEY: &[u8] = b"sk";

/// Process 0 deletes; 1 and 5 sweep; 2, 3 and 4 add (3 is killed).
fn role(process: usize) -> &'static str {
    match process {
        0 => "delete",
        1 | 5 => "sweep",
        _ => "add",
    }
}

fn me() -> Holder {
    Holder {
        pid: std::process::id(),
        instance: 1,
    }
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

const OWNER: Process = Process { me, alive };

fn now() -> u64 {
    1
}

fn add(c: &Current) -> Result<Change, ()> {
    Ok(Change::Write {
        value: c.value + 1,
        expiry_ms: 0,
    })
}

fn pair_of<'a>(record: &Record<'a, AtomicU64>) -> &'a AtomicPair {
    unsafe { AtomicPair::of_cells(record.cells().as_ptr()) }
}

/// The key's record, made when it has none.
fn find<'a>(table: &Table<'a, AtomicU64>) -> &'a AtomicPair {
    match table.get_or_insert(KEY, strict::WIDTH) {
        Ok((record, _)) => pair_of(&record),
        Err(_) => unsafe { libc::_exit(5) },
    }
}

/// Removes the key's record if it is absent or GONE, under the table lock.
fn reclaim(table: &Table<AtomicU64>) -> bool {
    table
        .remove_if(KEY, &OWNER, |record| strict::retire(pair_of(record), now))
        .unwrap_or(false)
}

fn adder(table: &Table<AtomicU64>, done: &AtomicU64, added: &AtomicU64) {
    let mut seen = table.epoch();
    let mut pair = find(table);
    for _ in 0..OPS {
        loop {
            let epoch = table.epoch();
            if epoch != seen {
                seen = epoch;
                pair = find(table);
            }
            match strict::update(pair, now, add) {
                Ok(_) => break,
                Err(Refused::Gone(_)) => {
                    reclaim(table);
                    pair = find(table);
                }
                Err(_) => unsafe { libc::_exit(3) },
            }
        }
        done.fetch_add(1, Relaxed);
        // Lets the others in (two cores, six processes): the parent must
        // catch this one mid-run.
        std::thread::yield_now();
    }
    added.fetch_add(1, Relaxed);
}

/// Deletes while the adders that are not killed (2 of them) add.
fn deleter(table: &Table<AtomicU64>, done: &AtomicU64, taken: &AtomicU64, added: &AtomicU64) {
    for i in 0..DELETES {
        if added.load(Relaxed) == 2 {
            break;
        }
        if let Some(record) = table.lookup(KEY) {
            let removed = strict::update(pair_of(&record), now, |_| Ok::<_, ()>(Change::Remove));
            if let Ok(state) = removed {
                taken.fetch_add(state.value as u64, Relaxed);
            }
            // Half the records are left to the sweepers.
            if i % 2 == 0 {
                reclaim(table);
            }
        }
        done.fetch_add(1, Relaxed);
        std::thread::yield_now();
    }
}

/// Sweeps until killed (both sweepers are).
fn sweeper(table: &Table<AtomicU64>, done: &AtomicU64) {
    loop {
        if let Some(record) = table.lookup(KEY) {
            let pair = pair_of(&record);
            if strict::reclaimable(pair.load_fast(), now) && strict::retire(pair, now) {
                // GONE and still in the table: what a sweeper killed here
                // leaves (adders reclaim it themselves).
                std::thread::yield_now();
                reclaim(table);
            }
        }
        done.fetch_add(1, Relaxed);
        std::thread::yield_now();
    }
}

#[test]
fn no_add_is_lost_to_removals_by_killed_sweepers() {
    assert!(strict::supported());
    let table = Table::init(shared_words(REGION_WORDS), [3, 5], 0).unwrap();
    let start = &shared_words(1)[0];
    let taken = &shared_words(1)[0];
    let added = &shared_words(1)[0];
    let done: Vec<&AtomicU64> = (0..PROCESSES).map(|_| &shared_words(1)[0]).collect();

    let mut pids = Vec::new();
    for (process, done) in done.iter().enumerate() {
        match unsafe { libc::fork() } {
            0 => {
                // A sweeper never ends by itself: gone with a failed parent.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                start.fetch_add(1, Relaxed);
                while start.load(Relaxed) < PROCESSES as u64 {
                    std::hint::spin_loop();
                }
                match role(process) {
                    "delete" => deleter(&table, done, taken, added),
                    "sweep" => sweeper(&table, done),
                    _ => adder(&table, done, added),
                }
                unsafe { libc::_exit(0) }
            }
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }
    let killed = kill_every_other(&pids, OPS, |process| done[process].load(Relaxed));

    let adds: u64 = (0..PROCESSES)
        .filter(|&p| role(p) == "add")
        .map(|p| done[p].load(Relaxed))
        .sum();
    let killed_adders = (0..PROCESSES)
        .filter(|&p| role(p) == "add" && killed[p])
        .count() as u64;
    let left = table.lookup(KEY).map_or(0, |record| {
        strict::get(pair_of(&record), now)
            .expect("not frozen")
            .value as u64
    });
    let taken = taken.load(Relaxed);
    let stats = table.stats();
    eprintln!(
        "adds {}, taken by deletes {}, left {}, records removed {}",
        adds, taken, left, stats.removed
    );
    let in_flight = (taken + left).checked_sub(adds).expect("an add was lost");
    assert!(in_flight <= killed_adders, "{} in flight", in_flight);
    assert!(killed[1] && killed[5] && killed[3]);
    assert!(stats.removed > 100, "{} removed", stats.removed);
}
