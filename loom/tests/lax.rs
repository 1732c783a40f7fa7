//! Every interleaving of a lax flush with a worker counting into the same
//! keys, for a flusher stopped after each step of the order (as a kill
//! leaves it), then a flusher that recovers: the model of Redis ends at
//! exactly every key's total added (nothing sent twice, nothing lost).

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;

use resty_counter_loom::lax::{Journal, Key, Outcome, JOURNAL_WIDTH, WIDTH};

const KEYS: usize = 2;

/// loom's exhaustive search, bounded to 3 preemptions a run.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn words(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

fn key(cells: &[AtomicU64], i: usize) -> Key<'_, AtomicU64> {
    Key::new(&cells[i * WIDTH as usize..(i + 1) * WIDTH as usize])
}

/// The model of Redis: values, and the batch ids applied (SET NX).
struct Redis {
    values: [i64; KEYS],
    applied: Vec<u64>,
}

impl Redis {
    fn send(&mut self, journal: &Journal<AtomicU64>) {
        let id = journal.in_flight();
        if self.applied.contains(&id) {
            return;
        }
        self.applied.push(id);
        for i in 0..journal.len() {
            let entry = journal.entry(i);
            self.values[entry.offset as usize] += entry.delta;
        }
    }
}

/// A flusher stopped after `stop` steps (1 journal, 2 send, 3 settle the
/// first key, 4 settle all) while a worker adds, then a full recovery.
fn flush_stopped_after(stop: u32) {
    model(move || {
        let cells = words(KEYS * WIDTH as usize);
        let journal_cells = words(JOURNAL_WIDTH as usize);
        let adder = {
            let cells = Arc::clone(&cells);
            thread::spawn(move || {
                key(&cells, 0).add(1).unwrap();
                key(&cells, 1).add(2).unwrap();
                key(&cells, 0).add(3).unwrap();
            })
        };

        // The flusher in a thread of its own too (loom explores the
        // spawned threads' interleavings).
        let flusher = {
            let cells = Arc::clone(&cells);
            let journal_cells = Arc::clone(&journal_cells);
            thread::spawn(move || {
                let journal = Journal::new(&journal_cells).unwrap();
                let mut redis = Redis {
                    values: [0; KEYS],
                    applied: Vec::new(),
                };
                if stop >= 1 {
                    journal.build((0..KEYS).map(|i| (i as u64, key(&cells, i))));
                }
                if stop >= 2 && journal.in_flight() != 0 {
                    redis.send(&journal);
                }
                if stop >= 3 && journal.len() > 0 {
                    let entry = journal.entry(0);
                    key(&cells, entry.offset as usize).settle(entry.target, entry.ttl);
                }
                if stop >= 4 {
                    journal.settle(Outcome::Applied, |offset| {
                        Some(key(&cells, offset as usize))
                    });
                }
                redis
            })
        };
        adder.join().unwrap();
        let mut redis = flusher.join().unwrap();

        let journal = Journal::new(&journal_cells).unwrap();
        let keys = || (0..KEYS).map(|i| (i as u64, key(&cells, i)));
        let key_at = |offset: u64| Some(key(&cells, offset as usize));

        // The next flusher (the lock taken over): the batch in flight
        // first, then new ones until nothing is left.
        for _ in 0..3 {
            if journal.in_flight() == 0 && journal.build(keys()) == 0 {
                break;
            }
            redis.send(&journal);
            journal.settle(Outcome::Applied, key_at);
        }
        for i in 0..KEYS {
            assert_eq!(redis.values[i], key(&cells, i).added(), "key {}", i);
            assert_eq!(key(&cells, i).unsent(), 0, "key {}", i);
        }
    });
}

#[test]
fn a_flusher_stopped_before_the_journal_loses_nothing() {
    flush_stopped_after(0);
}

#[test]
fn a_flusher_stopped_after_the_journal_loses_nothing() {
    flush_stopped_after(1);
}

#[test]
fn a_flusher_stopped_after_the_send_counts_nothing_twice() {
    flush_stopped_after(2);
}

#[test]
fn a_flusher_stopped_mid_settle_counts_nothing_twice() {
    flush_stopped_after(3);
}

#[test]
fn a_flusher_that_finished_leaves_only_later_counts() {
    flush_stopped_after(4);
}
