//! Lax flushes across processes, as nginx workers run them: forked
//! processes add to the same lax keys and flush them through the counter's
//! journal to a model of Redis that applies a batch once by its id, while
//! some are killed with SIGKILL: one holding the lock with its batch
//! built and not yet sent, one holding it with its batch applied and not
//! yet settled (each parks there when asked, and is killed once it says
//! so: a kill timed from outside missed every flush on a busy machine),
//! one at an arbitrary point (mid-add, mid-journal, mid-send, mid-settle,
//! or holding the lock if that comes within a second). A flush is also
//! told at random that its batch's fate is unknown (it ran) or that it
//! surely was not sent. Afterwards a last flush (taking over dead
//! holders' lock, sending a left batch first) empties the engine, and:
//!
//! - for every key, the model's value equals the total added: no count
//!   sent twice, none lost;
//! - every add a process reported done is in the total, and at most one
//!   per killed process beyond it (an add in flight at the kill).
//!
//! The model of Redis lives in the shared mapping too, and its apply is
//! atomic as a Redis script is: the batch is copied into its own slot,
//! then one compare-and-swap of the slot's id word commits it (SET NX).
//!
//! One test in this file: fork() is only safe with no other test threads
//! running, and the children allocate nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

mod common;
use common::{assert_ended, shared_words};

use resty_counter_core::engine::lax::{self, Journal, Key, Outcome};
use resty_counter_core::engine::lock::{self, Holder};
use resty_counter_core::engine::table::Table;

const PROCESSES: usize = 6;
const KEYS: usize = 8;
/// Progress (the sum of a process's steps, about one per add) at which
/// the killed ones are killed: process p at p times this.
const KILL_STEP: i64 = 40_000;
const FLUSH_EVERY: u64 = 2000;
const REGION_WORDS: usize = 1 << 14;
/// Batches the model of Redis can hold, each in its own slot.
const MODEL_BATCHES: usize = 1 << 17;
const SLOT_WORDS: usize = 2 + 2 * KEYS;

/// Where a flush parks when its process is asked to (`Park`'s word): its
/// batch built and not sent, or applied by Redis and not settled.
const PARK_BUILT: u64 = 1;
const PARK_APPLIED: u64 = 2;
/// What the parked process writes to that word, then waits for its kill.
const PARKED: u64 = 3;

/// A process's park word: 0, or the point its next flush with a batch
/// parks at (set by the parent), then `PARKED` (set by the process).
struct Park<'a>(&'a AtomicU64);

impl<'a> Park<'a> {
    /// At `point` of a flush, holding the lock: when asked to park here,
    /// says so and waits (without allocating) for the parent's SIGKILL.
    fn at(&self, point: u64) {
        if self.0.load(Relaxed) == point {
            self.0.store(PARKED, Relaxed);
            loop {
                unsafe { libc::usleep(1000) };
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// The model of Redis: per batch seq a slot (id word, count, then key index
/// and delta per entry), and an applied-ids count.
struct Redis<'a> {
    slots: &'a [AtomicU64],
}

impl<'a> Redis<'a> {
    /// Applies the journal's batch in flight once by its seq; false for a
    /// duplicate. `index` maps a record offset to the key's index.
    fn apply(&self, journal: &Journal<AtomicU64>, index: impl Fn(u64) -> usize) -> bool {
        let seq = journal.in_flight() as usize;
        assert!(seq > 0 && seq < MODEL_BATCHES, "batch seq {}", seq);
        let slot = &self.slots[seq * SLOT_WORDS..(seq + 1) * SLOT_WORDS];
        if slot[0].load(Relaxed) == seq as u64 {
            return false;
        }
        // The script's body: written whole before the commit below.
        slot[1].store(journal.len() as u64, Relaxed);
        for i in 0..journal.len() {
            let entry = journal.entry(i);
            slot[2 + 2 * i].store(index(entry.offset) as u64, Relaxed);
            slot[3 + 2 * i].store(entry.delta as u64, Relaxed);
        }
        slot[0]
            .compare_exchange(0, seq as u64, Relaxed, Relaxed)
            .is_ok()
    }

    /// Each key's value: the sum of the committed batches' deltas.
    fn values(&self) -> [i64; KEYS] {
        let mut values = [0; KEYS];
        for seq in 1..MODEL_BATCHES {
            let slot = &self.slots[seq * SLOT_WORDS..(seq + 1) * SLOT_WORDS];
            if slot[0].load(Relaxed) != seq as u64 {
                continue;
            }
            for i in 0..slot[1].load(Relaxed) as usize {
                let key = slot[2 + 2 * i].load(Relaxed) as usize;
                values[key] += slot[3 + 2 * i].load(Relaxed) as i64;
            }
        }
        values
    }
}

fn spin(times: u32) {
    for _ in 0..times {
        std::hint::spin_loop();
    }
}

struct Shared<'a> {
    journal: Journal<'a, AtomicU64>,
    keys: [(u64, Key<'a, AtomicU64>); KEYS],
    redis: Redis<'a>,
}

impl<'a> Shared<'a> {
    fn index(&self, offset: u64) -> usize {
        self.keys
            .iter()
            .position(|&(at, _)| at == offset)
            .expect("a journal entry names a key")
    }

    /// One flush as lax.lua runs it, with `outcome` for a new batch's
    /// send (a left batch is always sent again and applied); false when
    /// another live holder has the lock. `round_trip` spins stand for the
    /// send's time on the network, before and after Redis applies it;
    /// `park`, a child's, parks it mid-flush when the parent asks.
    fn flush(&self, me: Holder, outcome: Outcome, round_trip: u32, park: Option<&Park>) -> bool {
        if lock::try_lock(self.journal.lock_word(), me, alive).is_err() {
            return false;
        }
        let outcome = if self.journal.in_flight() != 0 {
            Outcome::Applied
        } else if self.journal.build(self.keys.iter().copied()) == 0 {
            lock::unlock(self.journal.lock_word(), me);
            return true;
        } else {
            outcome
        };
        let park_at = |point| {
            if let Some(park) = park {
                park.at(point);
            }
        };
        park_at(PARK_BUILT);
        spin(round_trip);
        if outcome != Outcome::NotSent {
            self.redis.apply(&self.journal, |offset| self.index(offset));
            park_at(PARK_APPLIED);
        }
        spin(round_trip);
        self.journal.settle(outcome, |offset| {
            self.keys
                .iter()
                .find(|&&(at, _)| at == offset)
                .map(|&(_, key)| key)
        });
        lock::unlock(self.journal.lock_word(), me);
        true
    }
}

fn child(
    shared: &Shared,
    process: usize,
    start: &AtomicU64,
    stop: &AtomicU64,
    done: &[AtomicU64],
    park: &Park,
) -> ! {
    let me = Holder {
        pid: std::process::id(),
        instance: 1,
    };
    start.fetch_add(1, Relaxed);
    while start.load(Relaxed) < PROCESSES as u64 {
        std::hint::spin_loop();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (process as u64 + 1);
    let mut op = 0u64;
    while stop.load(Relaxed) == 0 {
        op += 1;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let key = (state >> 8) as usize % KEYS;
        let step = (state >> 20) as i64 % 5 - 1;
        if shared.keys[key].1.add(step).is_err() {
            unsafe { libc::_exit(4) }
        }
        done[key].fetch_add(step as u64, Relaxed);
        if op % FLUSH_EVERY == 0 {
            let outcome = match (state >> 40) % 8 {
                0 => Outcome::Unknown,
                1 => Outcome::NotSent,
                _ => Outcome::Applied,
            };
            shared.flush(me, outcome, 20_000, Some(park));
        }
    }
    unsafe { libc::_exit(0) }
}

#[test]
fn flushers_killed_anywhere_send_every_count_exactly_once() {
    let table = Table::init(shared_words(REGION_WORDS), [3, 5], 0).unwrap();
    let (journal, _) = table
        .get_or_insert(b"jn\0", lax::JOURNAL_WIDTH)
        .expect("the journal");
    let key = |i: usize| {
        let (record, _) = table
            .get_or_insert(format!("ln\0{}", i).as_bytes(), lax::WIDTH)
            .expect("a key");
        (record.offset() as u64, Key::new(record.cells()))
    };
    let shared = Shared {
        journal: Journal::new(journal.cells()).unwrap(),
        keys: [
            key(0),
            key(1),
            key(2),
            key(3),
            key(4),
            key(5),
            key(6),
            key(7),
        ],
        redis: Redis {
            slots: shared_words(MODEL_BATCHES * SLOT_WORDS),
        },
    };
    let start = &shared_words(1)[0];
    let stop = &shared_words(1)[0];
    let done: Vec<&[AtomicU64]> = (0..PROCESSES).map(|_| shared_words(KEYS)).collect();

    let parks: Vec<Park> = (0..PROCESSES).map(|_| Park(&shared_words(1)[0])).collect();
    let mut pids = Vec::new();
    for (process, done) in done.iter().enumerate() {
        match unsafe { libc::fork() } {
            0 => child(&shared, process, start, stop, done, &parks[process]),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    // Kill every other process mid-run, each at another point of its run:
    // process 1 parked with its batch built, 3 parked with its batch
    // applied, 5 wherever it is (holding the flush lock if that comes
    // within a second); each reaped at once (a zombie still answers
    // kill(pid, 0)).
    let holds_lock =
        |pid: i32| lock::holder(shared.journal.lock_word()).map(|h| h.pid) == Some(pid as u32);
    let mut killed = HashSet::new();
    let mut killed_holding = 0;
    for (process, &pid) in pids.iter().enumerate() {
        if process % 2 == 1 {
            let at = KILL_STEP * process as i64;
            let progress = || {
                done[process]
                    .iter()
                    .map(|d| d.load(Relaxed) as i64)
                    .sum::<i64>()
            };
            // Steps average 1 a call: the sum tracks the progress.
            while progress() < at {
                std::thread::sleep(Duration::from_micros(50));
            }
            let point = match process {
                1 => PARK_BUILT,
                3 => PARK_APPLIED,
                _ => 0,
            };
            if point != 0 {
                parks[process].0.store(point, Relaxed);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while parks[process].0.load(Relaxed) != PARKED {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "process {} did not park mid-flush within 60 s",
                        process
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                assert!(
                    holds_lock(pid),
                    "process {} parked without the lock",
                    process
                );
            } else {
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                while !holds_lock(pid) && std::time::Instant::now() < deadline {
                    std::hint::spin_loop();
                }
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if holds_lock(pid) {
                killed_holding += 1;
            }
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_ended(process, status, true);
            killed.insert(process);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(1, Relaxed);
    for (process, &pid) in pids.iter().enumerate() {
        if !killed.contains(&process) {
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_ended(process, status, false);
        }
    }

    // The last flush: this process, after every child is gone.
    let me = Holder {
        pid: std::process::id(),
        instance: 2,
    };
    for _ in 0..1000 {
        assert!(
            shared.flush(me, Outcome::Applied, 0, None),
            "the lock is stuck"
        );
        if shared.journal.in_flight() == 0 && shared.keys.iter().all(|(_, key)| key.unsent() == 0) {
            break;
        }
    }
    assert!(
        killed_holding >= 2,
        "processes killed mid-flush: {}",
        killed_holding
    );
    let values = shared.redis.values();
    let killed_count = killed.len() as i64;
    for (i, (_, key)) in shared.keys.iter().enumerate() {
        assert_eq!(key.unsent(), 0, "key {} still has counts unsent", i);
        let added = key.added();
        assert_eq!(
            values[i], added,
            "key {}: Redis {} vs added {}",
            i, values[i], added
        );
        let done_sum: i64 = done.iter().map(|d| d[i].load(Relaxed) as i64).sum();
        // An add in flight at a kill: its step is -1 to 3.
        let off = added - done_sum;
        assert!(
            off.abs() <= 3 * killed_count,
            "key {}: added {} vs {} done",
            i,
            added,
            done_sum
        );
    }
}
