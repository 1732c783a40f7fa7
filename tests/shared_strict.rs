//! Strict records across processes, as nginx workers use them: forked
//! processes add to two keys with single updates and move one from the
//! first to the second with batches (all or nothing), on one shared
//! mapping, and some are killed with SIGKILL mid-run, mid-batch included
//! (half their operations are batches). Afterwards:
//!
//! - no record is left frozen and the batch lock is free, once a survivor
//!   (or the parent) has met what a killed batch left;
//! - a + b is the adds reported done, plus at most one in flight per
//!   killed process: a move changes a + b never, so a batch applied to one
//!   key and not the other shows here;
//! - b's moves are at least those reported done (a batch is never lost
//!   once done).
//!
//! One test in this file: fork() is only safe with no other test threads
//! running.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod common;
use common::{kill_every_other, shared_words};

use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::strict::{
    self, AtomicPair, Batches, Change, Current, Refused, CONTROL_WIDTH, ENTRY_WORDS,
};
use resty_counter_core::engine::table::Table;

const PROCESSES: usize = 6;
const OPS: u64 = 2_000_000;
const REGION_WORDS: usize = 1 << 12;

/// Per process: adds to a, adds to b, moves, completed.
const ADDS_A: usize = 0;
const ADDS_B: usize = 1;
const MOVES: usize = 2;

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn now() -> u64 {
    1
}

fn add(c: &Current) -> Result<Change, ()> {
    Ok(Change::Write {
        value: c.value + 1,
        expiry_ms: 0,
    })
}

struct Shared<'a> {
    pairs: [&'a AtomicPair; 2],
    control: &'a [AtomicU64],
    journal: &'a [AtomicU64],
}

fn batches<'a>(shared: &Shared<'a>, alive: &'a dyn Fn(u32) -> bool) -> Batches<'a, AtomicU64> {
    Batches {
        control: shared.control,
        me: Holder {
            pid: std::process::id(),
            instance: 1,
        },
        alive,
    }
}

fn child(shared: &Shared, start: &AtomicU64, done: &[AtomicU64]) -> ! {
    start.fetch_add(1, Relaxed);
    while start.load(Relaxed) < PROCESSES as u64 {
        std::hint::spin_loop();
    }
    let alive_fn = alive;
    let batch = batches(shared, &alive_fn);
    let (mut states, mut changes) = (Vec::with_capacity(2), Vec::with_capacity(2));
    for i in 0..OPS {
        if i % 2 == 0 {
            let which = (i / 2 % 2) as usize;
            loop {
                match strict::update(shared.pairs[which], now, add) {
                    Ok(_) => break,
                    Err(Refused::Busy) => unsafe {
                        batch.help::<AtomicPair>();
                        std::thread::yield_now();
                    },
                    Err(Refused::Op(())) => unsafe { libc::_exit(3) },
                    Err(Refused::Gone(_)) => unsafe { libc::_exit(4) },
                }
            }
            done[which].fetch_add(1, Relaxed);
            continue;
        }
        loop {
            let ran = unsafe {
                batch.run(
                    &shared.pairs,
                    shared.journal,
                    now,
                    |s, c| {
                        // One from a to b.
                        for ((change, state), step) in c.iter_mut().zip(s).zip([-1, 1]) {
                            *change = Change::Write {
                                value: state.value + step,
                                expiry_ms: 0,
                            };
                        }
                        Ok::<_, ()>(())
                    },
                    &mut states,
                    &mut changes,
                )
            };
            match ran {
                Ok(()) => break,
                Err(_) => std::thread::yield_now(),
            }
        }
        done[MOVES].fetch_add(1, Relaxed);
    }
    unsafe { libc::_exit(0) }
}

#[test]
fn batches_killed_midway_are_finished_and_nothing_done_is_lost() {
    assert!(strict::supported());
    let table = Table::init(shared_words(REGION_WORDS), [3, 5], 0).unwrap();
    let cells = |key: &[u8], width: u32| table.get_or_insert(key, width).unwrap().0.cells();
    let (a, b) = (cells(b"sa", strict::WIDTH), cells(b"sb", strict::WIDTH));
    let shared = Shared {
        pairs: unsafe {
            [
                AtomicPair::of_cells(a.as_ptr()),
                AtomicPair::of_cells(b.as_ptr()),
            ]
        },
        control: cells(b"s\0batch", CONTROL_WIDTH),
        journal: cells(b"s\0journal", (8 * ENTRY_WORDS) as u32),
    };
    let start = &shared_words(1)[0];
    let done: Vec<&[AtomicU64]> = (0..PROCESSES).map(|_| shared_words(3)).collect();

    let mut pids = Vec::new();
    for done in &done {
        match unsafe { libc::fork() } {
            0 => child(&shared, start, done),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    // Every other process killed mid-run, each at another point of it.
    let killed = kill_every_other(&pids, OPS, |process| {
        done[process].iter().map(|d| d.load(Relaxed)).sum::<u64>()
    });

    // What the last killed batch may have left, finished as a worker would.
    let alive_fn = alive;
    assert!(unsafe { batches(&shared, &alive_fn).help::<AtomicPair>() });
    let value = |i: usize| strict::get(shared.pairs[i], now).expect("not frozen").value;
    let sum = |what: usize| {
        done.iter()
            .map(|d| d[what].load(Relaxed) as i64)
            .sum::<i64>()
    };
    let killed_count = killed.iter().filter(|&&k| k).count() as i64;
    let (a, b) = (value(0), value(1));
    let in_flight = a + b - sum(ADDS_A) - sum(ADDS_B);
    assert!(
        (0..=killed_count).contains(&in_flight),
        "a {} + b {} against {} adds done",
        a,
        b,
        sum(ADDS_A) + sum(ADDS_B)
    );
    assert!(b - sum(ADDS_B) >= sum(MOVES), "a move done was lost");
    assert!(sum(MOVES) > 0);
    eprintln!(
        "a {} b {}: adds {} + {}, moves {}, in flight {}",
        a,
        b,
        sum(ADDS_A),
        sum(ADDS_B),
        sum(MOVES),
        in_flight
    );
}
