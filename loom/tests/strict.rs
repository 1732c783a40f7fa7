//! Every interleaving of the strict records' protocol
//! (src/engine/strict.rs) with the pair as one atomic unit (a loom Mutex
//! around the two words: a fair model of a hardware double-width
//! compare-and-swap): a single update racing a batch, a snapshot racing a
//! batch, and a batch killed before and after it decided, finished by
//! exactly one of the two workers that meet it (an update and a batch); an
//! update and a batch racing the removal of a record (GONE).

use loom::sync::atomic::AtomicU64;
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::sync::atomic::Ordering::SeqCst;

use resty_counter_loom::lock::{holder, Holder};
use resty_counter_loom::strict::{
    get, reclaimable, retire, update, Batches, Change, Current, Pair, Refused, CONTROL_WIDTH,
};

use resty_counter_loom::ModelPair;

/// Two records, the batch control cells and a journal for two.
struct Engine {
    pairs: [ModelPair; 2],
    control: Vec<AtomicU64>,
    journal: Vec<AtomicU64>,
}

const DEAD: u32 = 7;

fn alive(pid: u32) -> bool {
    pid != DEAD
}

fn batches(engine: &Engine, pid: u32) -> Batches<'_, AtomicU64> {
    Batches {
        control: &engine.control,
        me: Holder { pid, instance: 1 },
        alive: &alive,
    }
}

fn engine(a: i64, b: i64) -> Arc<Engine> {
    let present = |v: i64| ModelPair(Mutex::new([v as u64, 4 | 1]));
    Arc::new(Engine {
        pairs: [present(a), present(b)],
        control: (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect(),
        journal: (0..6).map(|_| AtomicU64::new(0)).collect(),
    })
}

const NOW: fn() -> u64 = || 1;

fn add(step: i64) -> impl FnMut(&Current) -> Result<Change, ()> + Copy {
    move |c| {
        Ok(Change::Write {
            value: c.value + step,
            expiry_ms: 0,
        })
    }
}

/// A single update as a worker makes it: on a frozen record, help (or
/// wait for) the batch, then again.
fn single(engine: &Engine, pid: u32, which: usize, step: i64) {
    loop {
        match update(&engine.pairs[which], NOW, add(step)) {
            Ok(_) => return,
            Err(Refused::Busy) => {
                unsafe { batches(engine, pid).help::<ModelPair>() };
                thread::yield_now();
            }
            Err(Refused::Op(())) | Err(Refused::Gone(_)) => unreachable!(),
        }
    }
}

/// The changes that move one from a to b.
fn move_one(s: &[Current]) -> [Change; 2] {
    [
        Change::Write {
            value: s[0].value - 1,
            expiry_ms: 0,
        },
        Change::Write {
            value: s[1].value + 1,
            expiry_ms: 0,
        },
    ]
}

/// A worker adding 100 to a and one moving one from a to b, at once.
fn adder_and_mover(e: &Arc<Engine>) -> [thread::JoinHandle<()>; 2] {
    let adder = {
        let e = Arc::clone(e);
        thread::spawn(move || single(&e, 1, 0, 100))
    };
    let mover = {
        let e = Arc::clone(e);
        thread::spawn(move || {
            batch(&e, 2, true);
        })
    };
    [adder, mover]
}

/// A batch that moves one from a to b (`moving`) or reads both.
fn batch(engine: &Engine, pid: u32, moving: bool) -> Vec<Current> {
    let pairs = [&engine.pairs[0], &engine.pairs[1]];
    let (mut states, mut changes) = (Vec::new(), Vec::new());
    loop {
        let ran = unsafe {
            batches(engine, pid).run(
                &pairs,
                &engine.journal,
                NOW,
                |s, c| {
                    if moving {
                        c.copy_from_slice(&move_one(s));
                    }
                    Ok::<_, ()>(())
                },
                &mut states,
                &mut changes,
            )
        };
        match ran {
            Ok(()) => return states,
            Err(_) => thread::yield_now(),
        }
    }
}

fn value(engine: &Engine, which: usize) -> i64 {
    get(&engine.pairs[which], NOW).unwrap().value
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    // Waiting (for a batch, for the lock) loops with a yield each time.
    builder.max_branches = 100_000;
    builder.check(f);
}

#[test]
fn a_single_update_racing_a_batch_is_not_lost() {
    model(|| {
        let e = engine(10, 0);
        let [adder, mover] = adder_and_mover(&e);
        adder.join().unwrap();
        mover.join().unwrap();
        assert_eq!((value(&e, 0), value(&e, 1)), (109, 1));
        assert_eq!(holder(&e.control[0]), None);
    });
}

#[test]
fn a_snapshot_never_sees_half_a_batch() {
    model(|| {
        let e = engine(10, 0);
        let mover = {
            let e = Arc::clone(&e);
            thread::spawn(move || {
                batch(&e, 2, true);
            })
        };
        let seen = batch(&e, 3, false);
        let (a, b) = (seen[0].value, seen[1].value);
        assert!(
            (a, b) == (10, 0) || (a, b) == (9, 1),
            "snapshot {} {}",
            a,
            b
        );
        mover.join().unwrap();
        assert_eq!((value(&e, 0), value(&e, 1)), (9, 1));
    });
}

/// A batch of pid DEAD that froze both records (and, `decided`, committed
/// a move of one from a to b), then died.
fn dead_batch(decided: bool) -> Arc<Engine> {
    let e = engine(10, 0);
    {
        let pairs = [&e.pairs[0], &e.pairs[1]];
        let dead = batches(&e, DEAD);
        let mut open = unsafe { dead.begin(&pairs, &e.journal) }.unwrap();
        if decided {
            open.commit(&move_one(&open.states(NOW)));
        }
        std::mem::forget(open);
    }
    e
}

#[test]
fn a_batch_killed_before_or_after_it_decided_is_finished_once() {
    for decided in [false, true] {
        model(move || {
            let e = dead_batch(decided);
            let [adder, mover] = adder_and_mover(&e);
            adder.join().unwrap();
            mover.join().unwrap();
            let moved = if decided { 2 } else { 1 };
            assert_eq!((value(&e, 0), value(&e, 1)), (110 - moved, moved));
            assert_eq!(holder(&e.control[0]), None);
        });
    }
}

/// A key's records as the table holds them: the one lookups find now
/// (`current`: lock-free, as the index) and its successor, which a
/// look-up after a removal makes. Removals take `table` (the table lock).
struct Keyed {
    pairs: [ModelPair; 2],
    current: loom::sync::atomic::AtomicUsize,
    table: Mutex<()>,
}

fn keyed(value: i64) -> Arc<Keyed> {
    Arc::new(Keyed {
        pairs: [
            ModelPair(Mutex::new([value as u64, 4 | 1])),
            ModelPair(Mutex::new([0, 4])),
        ],
        current: loom::sync::atomic::AtomicUsize::new(0),
        table: Mutex::new(()),
    })
}

/// Removes record `i` of the key if `judge` lets it go, under the table
/// lock (as `Table::remove_if`): the next look-up finds the successor.
fn remove_if(k: &Keyed, i: usize, judge: impl FnOnce(&ModelPair) -> bool) -> bool {
    let _locked = k.table.lock().unwrap();
    if k.current.load(SeqCst) != i || !judge(&k.pairs[i]) {
        return false;
    }
    k.current.store(i + 1, SeqCst);
    true
}

/// A worker's `inc`: the record it looked up (maybe one being removed),
/// then one compare-and-swap; on GONE, the key is reclaimed and looked
/// up again. Returns the record it counted in.
fn inc(k: &Keyed) -> usize {
    loop {
        let i = k.current.load(SeqCst);
        match update(&k.pairs[i], NOW, add(1)) {
            Ok(_) => return i,
            Err(Refused::Gone(_)) => {
                remove_if(k, i, |p| retire(p, NOW));
            }
            Err(_) => unreachable!(),
        }
    }
}

/// An update racing a `del` and the removal of the key's record: the
/// remover judges the pair absent and retires it (GONE) under the table
/// lock; the update, wherever it lands, is kept: in what `del` took, or
/// in the record lookups find after.
fn update_racing_a_removal(remove: fn(&ModelPair) -> bool) {
    model(move || {
        let k = keyed(5);
        let updater = {
            let k = Arc::clone(&k);
            thread::spawn(move || inc(&k))
        };
        let taken = update(&k.pairs[0], NOW, |_| Ok::<_, ()>(Change::Remove))
            .unwrap()
            .value;
        let removed = remove_if(&k, 0, remove);
        let counted_in = updater.join().unwrap();
        let now = k.current.load(SeqCst);
        let left = get(&k.pairs[now], NOW).unwrap().value;
        assert_eq!(
            taken + left,
            6,
            "removed {} counted in {}",
            removed,
            counted_in
        );
        if removed {
            assert_eq!(k.pairs[0].0.lock().unwrap()[1], 2, "GONE");
        }
    });
}

#[test]
fn no_update_lands_in_a_removed_record() {
    update_racing_a_removal(|p| retire(p, NOW));
}

/// The same remover without the GONE step (it judges the pair, then
/// removes the record): an update that read the pair before and writes it
/// after lands in the removed record, lost. The model finds it.
#[test]
#[should_panic(expected = "removed true counted in 0")]
fn without_the_gone_step_an_update_is_lost() {
    update_racing_a_removal(|p| reclaimable(p.load(), NOW));
}

/// A batch (moving one from a to b) racing the removal of b's record
/// (absent): it freezes b before the removal judges it (the removal backs
/// off), or meets GONE, rolls back and runs again on b's successor.
#[test]
fn a_batch_racing_a_removal_is_whole() {
    model(|| {
        let a = ModelPair(Mutex::new([10, 4 | 1]));
        let k = Arc::new(Keyed {
            pairs: [ModelPair(Mutex::new([0, 4])), ModelPair(Mutex::new([0, 4]))],
            current: loom::sync::atomic::AtomicUsize::new(0),
            table: Mutex::new(()),
        });
        let e = Arc::new(Engine {
            pairs: [a, ModelPair(Mutex::new([0, 0]))],
            control: (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect(),
            journal: (0..6).map(|_| AtomicU64::new(0)).collect(),
        });
        let remover = {
            let k = Arc::clone(&k);
            thread::spawn(move || remove_if(&k, 0, |p| retire(p, NOW)))
        };
        let (mut states, mut changes) = (Vec::new(), Vec::new());
        loop {
            let i = k.current.load(SeqCst);
            let pairs = [&e.pairs[0], &k.pairs[i]];
            let ran = unsafe {
                batches(&e, 2).run(
                    &pairs,
                    &e.journal,
                    NOW,
                    |s, c| {
                        c.copy_from_slice(&move_one(s));
                        Ok::<_, ()>(())
                    },
                    &mut states,
                    &mut changes,
                )
            };
            match ran {
                Ok(()) => break,
                Err(Refused::Gone(1)) => {
                    remove_if(&k, i, |p| retire(p, NOW));
                }
                Err(e) => panic!("{:?}", e),
            }
        }
        let removed = remover.join().unwrap();
        let b = get(&k.pairs[k.current.load(SeqCst)], NOW).unwrap().value;
        assert_eq!(
            (get(&e.pairs[0], NOW).unwrap().value, b),
            (9, 1),
            "removed {}",
            removed
        );
        assert_eq!(holder(&e.control[0]), None);
    });
}
