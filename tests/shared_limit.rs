//! Limit records across processes, as nginx workers use them: forked
//! processes race for one key's window at its cap on one shared mapping,
//! some killed with SIGKILL mid-run (those run events until killed: with
//! a bounded run, a fast child on a busy machine, its parent descheduled,
//! ended before its kill). An event is one compare-and-swap, so
//! a kill leaves no half-written pair: the record's count is the events
//! reported allowed, plus at most one in flight per killed process, and
//! never more than the limit.
//!
//! One test in this file: fork() is only safe with no other test threads
//! running.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod common;
use common::{kill_every_other, killed_mid_run, shared_words};

use resty_counter_core::engine::limit::{self, Rule};
use resty_counter_core::engine::strict::{self, AtomicPair};
use resty_counter_core::engine::table::Table;

const PROCESSES: usize = 6;
/// Events of a process that is not killed (and the run by which
/// `kill_every_other` places the kills).
const EVENTS: u64 = 400_000;
const LIMIT: u64 = 1_000_000;
const REGION_WORDS: usize = 1 << 12;
const RULE: Rule = Rule {
    limit: LIMIT,
    window: 1.0,
    sliding: false,
};

/// Per process: events allowed, events rejected.
const ALLOWED: usize = 0;
const REJECTED: usize = 1;

/// A child's life: `events` events (`u64::MAX`: until it is killed).
fn child(pair: &AtomicPair, start: &AtomicU64, done: &[AtomicU64], events: u64) -> ! {
    start.fetch_add(1, Relaxed);
    while start.load(Relaxed) < PROCESSES as u64 {
        std::hint::spin_loop();
    }
    for _ in 0..events {
        let which = if limit::incoming(pair, &RULE, 9, 0.5, true).allowed {
            ALLOWED
        } else {
            REJECTED
        };
        done[which].fetch_add(1, Relaxed);
    }
    unsafe { libc::_exit(0) }
}

#[test]
fn processes_killed_at_the_cap_never_pass_it() {
    assert!(strict::supported());
    let table = Table::init(shared_words(REGION_WORDS), [3, 5], 0).unwrap();
    let cells = table.get_or_insert(b"wk", limit::WIDTH).unwrap().0.cells();
    let pair = unsafe { AtomicPair::of_cells(cells.as_ptr()) };
    let start = &shared_words(1)[0];
    let done: Vec<&[AtomicU64]> = (0..PROCESSES).map(|_| shared_words(2)).collect();

    let mut pids = Vec::new();
    for (process, done) in done.iter().enumerate() {
        let events = if killed_mid_run(process) {
            u64::MAX
        } else {
            EVENTS
        };
        match unsafe { libc::fork() } {
            0 => child(pair, start, done, events),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    // Every other process killed mid-run, each at another point of it.
    let killed = kill_every_other(&pids, EVENTS, |process| {
        done[process].iter().map(|d| d.load(Relaxed)).sum::<u64>()
    });

    let sum = |what: usize| done.iter().map(|d| d[what].load(Relaxed)).sum::<u64>();
    let count = limit::counts(pair, 9).current;
    let killed_count = killed.iter().filter(|&&k| k).count() as u64;
    let in_flight = count - sum(ALLOWED);
    eprintln!(
        "count {}: allowed {}, rejected {}, in flight {}",
        count,
        sum(ALLOWED),
        sum(REJECTED),
        in_flight
    );
    assert!(count <= LIMIT, "past the cap: {}", count);
    assert!(
        in_flight <= killed_count,
        "count {} against {} allowed",
        count,
        sum(ALLOWED)
    );
    // The load passed the cap (else the test proves nothing about it).
    assert_eq!(count, LIMIT);
    assert!(sum(REJECTED) > 0);
}
