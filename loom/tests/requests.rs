//! Every interleaving of the request record's roll protocol
//! (src/engine/requests.rs): writers racing to roll a window slot, a roll
//! left by a dead writer, a reader snapshotting while a slot rolls. Most
//! records have no histogram buckets (the protocol is the same; it keeps
//! the model small: a roll zeroes 3 cells, not 197); the last two models
//! have them, for the lines word (a bit per cache line of the buckets
//! with a count: the writer marks, then adds; the reader loads the mark,
//! then the line; a roll zeroes both before the new stamp).

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;

use resty_counter_loom::histogram::Histogram;
use resty_counter_loom::lock::{holder, try_lock, Holder};
use resty_counter_loom::requests::{Layout, Recorded, Requests, Roller};

/// A thread as a worker: its own pid; `dead` pids are gone.
struct Worker {
    pid: u32,
    dead: u32,
}

impl Roller for Worker {
    fn me(&self) -> Holder {
        Holder {
            pid: self.pid,
            instance: 1,
        }
    }

    fn alive(&self, pid: u32) -> bool {
        pid != self.dead
    }

    fn pause(&self, _: u32) {
        thread::yield_now();
    }

    fn spins(&self) -> u32 {
        // Enough for a roller that runs; a roller loom never runs again
        // gives TotalOnly, which the tests count.
        3
    }
}

/// loom's exhaustive search, bounded to 3 preemptions a run (the usual
/// bound: races need few); unbounded, these take some 8 minutes.
fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(3, f);
}

/// [`model`] bounded to `preemptions` a run: a reader of a record with
/// histograms races a roll of 197 stores (3 take minutes).
fn model_bounded(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(f);
}

fn layout() -> Layout {
    Layout::new(1, false).unwrap()
}

/// A record of one window slot, holding window 0 with one request of 5 ms.
fn record() -> Arc<Vec<AtomicU64>> {
    record_of(layout(), 5.0)
}

/// A record of `layout` holding window 0 with one request of `ms`.
fn record_of(layout: Layout, ms: f64) -> Arc<Vec<AtomicU64>> {
    let cells: Vec<AtomicU64> = (0..layout.width()).map(|_| AtomicU64::new(0)).collect();
    let setup = Worker { pid: 99, dead: 0 };
    let r = Requests::new(&cells, layout).unwrap();
    assert_eq!(r.record(0, ms, &setup), Recorded::Window);
    Arc::new(cells)
}

fn writer(cells: &Arc<Vec<AtomicU64>>, pid: u32, dead: u32) -> thread::JoinHandle<Recorded> {
    let cells = Arc::clone(cells);
    thread::spawn(move || {
        let r = Requests::new(&cells, layout()).unwrap();
        r.record(1, 7.0, &Worker { pid, dead })
    })
}

#[test]
fn two_writers_racing_a_roll_lose_no_request() {
    model(|| {
        let cells = record();
        let a = writer(&cells, 1, 0);
        let b = writer(&cells, 2, 0);
        let results = [a.join().unwrap(), b.join().unwrap()];
        let r = Requests::new(&cells, layout()).unwrap();
        let in_window = results.iter().filter(|&&x| x == Recorded::Window).count() as u64;
        assert!(in_window >= 1, "the roller counts in its window");
        let w = r.window(1).expect("window 1 holds the slot");
        assert_eq!(w.count, in_window);
        assert_eq!(w.sum, 7.0 * in_window as f64);
        assert_eq!(r.window(0), None);
        assert_eq!(r.total().count, 3);
        assert_eq!(holder(&cells[13]), None, "the roll lock is free");
    });
}

#[test]
fn a_roll_left_by_a_dead_writer_is_finished_by_one_of_two() {
    model(|| {
        let cells = record();
        // Pid 7 died mid-roll: the lock is its, the slot ROLLING.
        let dead = Holder {
            pid: 7,
            instance: 1,
        };
        try_lock(&cells[13], dead, |_| true).unwrap();
        cells[14].store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let a = writer(&cells, 1, 7);
        let b = writer(&cells, 2, 7);
        let results = [a.join().unwrap(), b.join().unwrap()];
        let r = Requests::new(&cells, layout()).unwrap();
        let in_window = results.iter().filter(|&&x| x == Recorded::Window).count() as u64;
        assert!(in_window >= 1);
        assert_eq!(r.window(1).unwrap().count, in_window);
        assert_eq!(r.total().count, 3);
        assert_eq!(holder(&cells[13]), None);
    });
}

#[test]
fn a_reader_sees_the_old_window_whole_or_not_at_all() {
    model(|| {
        let cells = record();
        let w = writer(&cells, 1, 0);
        let reader = {
            let cells = Arc::clone(&cells);
            thread::spawn(move || {
                let r = Requests::new(&cells, layout()).unwrap();
                (r.window(0), r.window(1))
            })
        };
        let (old, new) = reader.join().unwrap();
        assert_eq!(w.join().unwrap(), Recorded::Window);
        if let Some(old) = old {
            // Never a half-zeroed window 0.
            assert_eq!((old.count, old.sum, old.max), (1, 5.0, 5.0));
        }
        if let Some(new) = new {
            // Window 1 before or after its one request, never window 0's.
            assert!(new.count <= 1);
            assert!(new.sum == 0.0 || new.sum == 7.0, "{}", new.sum);
            assert!(new.max == 0.0 || new.max == 7.0, "{}", new.max);
        }
    });
}

#[test]
fn a_total_never_has_more_below_an_edge_than_its_count() {
    model(|| {
        let cells = record();
        // One more request, at or below the first edge (5 ms) as the first.
        let w = {
            let cells = Arc::clone(&cells);
            thread::spawn(move || {
                let r = Requests::new(&cells, layout()).unwrap();
                r.record(0, 3.0, &Worker { pid: 1, dead: 0 })
            })
        };
        let r = Requests::new(&cells, layout()).unwrap();
        let total = r.total();
        let last = *total.at_or_below.last().unwrap();
        assert!(
            last <= total.count,
            "{} at or below the last edge, count {}",
            last,
            total.count
        );
        assert!(total.at_or_below[0] <= total.count);
        w.join().unwrap();
        assert_eq!(r.total().count, 2);
        assert_eq!(r.total().at_or_below[0], 2);
    });
}

// The lines word (a bit per cache line of a slot's buckets that has a
// count): records with histograms, one window slot of 198 cells.

fn dense() -> Layout {
    Layout::new(1, true).unwrap()
}

/// A record with histograms holding window 0 with one request of 30 ms:
/// the line of 30 ms's bucket is marked.
fn dense_record() -> Arc<Vec<AtomicU64>> {
    record_of(dense(), 30.0)
}

/// A histogram of one request of `ms`.
fn one(ms: f64) -> Histogram {
    let mut h = Histogram::new();
    h.record(ms);
    h
}

#[test]
fn a_writer_after_a_roll_marks_its_line_again() {
    model(|| {
        let cells = dense_record();
        // 30 ms's line is marked in window 0, 4 ms's not: whichever rolls,
        // the other must find the lines word zeroed with the new stamp, or
        // it adds a count whose line no reader loads (the old mark kept
        // it from marking, or a late zeroing undid its mark).
        let writers: Vec<_> = [(1, 30.0), (2, 4.0)]
            .iter()
            .map(|&(pid, ms)| {
                let cells = Arc::clone(&cells);
                thread::spawn(move || {
                    let r = Requests::new(&cells, dense()).unwrap();
                    (r.record(1, ms, &Worker { pid, dead: 0 }), ms)
                })
            })
            .collect();
        let mut expected = Histogram::new();
        for writer in writers {
            let (recorded, ms) = writer.join().unwrap();
            if recorded == Recorded::Window {
                expected.record(ms);
            }
        }
        assert!(expected.count >= 1, "the roller counts in its window");
        let r = Requests::new(&cells, dense()).unwrap();
        assert_eq!(r.window(1).unwrap(), expected);
        assert_eq!(r.window(0), None);
    });
}

#[test]
fn a_reader_sees_the_old_window_s_buckets_whole_or_not_at_all() {
    model_bounded(2, || {
        let cells = dense_record();
        let w = {
            let cells = Arc::clone(&cells);
            thread::spawn(move || {
                let r = Requests::new(&cells, dense()).unwrap();
                r.record(1, 4.0, &Worker { pid: 1, dead: 0 })
            })
        };
        let r = Requests::new(&cells, dense()).unwrap();
        let old = r.window(0);
        assert_eq!(w.join().unwrap(), Recorded::Window);
        if let Some(old) = old {
            // Never a half-zeroed window 0 (its lines word zeroed, its
            // bucket not, or the other way round): its bucket with its
            // count, sum and maximum.
            assert_eq!(old, one(30.0));
        }
    });
}
