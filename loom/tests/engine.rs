//! Every interleaving of the engine's lock-free paths, under loom's model
//! of the C++/Rust memory model (Relaxed stores may be seen late, only
//! Release/Acquire pairs order them).

use std::hash::Hasher;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use loom::sync::atomic::{fence, AtomicU64};
use loom::sync::Arc;
use loom::thread;
use siphasher::sip::SipHasher13;

use resty_counter_loom::cell::{add_i64, load_i64};
use resty_counter_loom::counter::SyncProgress;
use resty_counter_loom::lock::{holder, try_lock, unlock, Holder, Taken};
use resty_counter_loom::table::{Owner, Table, GRACE_SECONDS, MIN_WORDS};

const SEED: [u64; 2] = [1, 2];

fn region() -> Arc<Vec<AtomicU64>> {
    let words: Vec<AtomicU64> = (0..MIN_WORDS).map(|_| AtomicU64::new(0)).collect();
    Table::init(&words, SEED, 0).unwrap();
    Arc::new(words)
}

/// A worker as the table lock knows it (each thread its own pid), on a
/// clock that stands still at `now`; its waits are loom's yields.
struct Worker {
    pid: u32,
    now: u64,
}

impl Owner for Worker {
    fn me(&self) -> Holder {
        Holder {
            pid: self.pid,
            instance: 1,
        }
    }

    fn alive(&self, _: u32) -> bool {
        true
    }

    fn now(&self) -> u64 {
        self.now
    }

    fn pause(&self, _: u32) {
        thread::yield_now();
    }
}

fn worker(pid: u32) -> Worker {
    Worker { pid, now: 0 }
}

/// Inserts `key` in a thread of its own, adds 1 to its first cell, and
/// returns the record's offset.
fn insert_and_count(
    region: &Arc<Vec<AtomicU64>>,
    key: &'static [u8],
    pid: u32,
) -> thread::JoinHandle<usize> {
    let region = Arc::clone(region);
    thread::spawn(move || {
        let table = Table::attach(&region, 0).unwrap();
        let me = worker(pid);
        let (record, _) = table.get_or_insert_by(key, 2, &me).unwrap();
        add_i64(&record.cells()[0], 1).unwrap();
        record.offset()
    })
}

/// Two keys whose probes start at the same index slot (a table of
/// MIN_WORDS has 16).
fn colliding_keys() -> (&'static [u8], &'static [u8]) {
    let slot = |key: &[u8]| {
        let mut hasher = SipHasher13::new_with_keys(SEED[0], SEED[1]);
        hasher.write(key);
        hasher.finish() & 15
    };
    let keys: Vec<&'static [u8]> = vec![
        b"k0", b"k1", b"k2", b"k3", b"k4", b"k5", b"k6", b"k7", b"k8", b"k9", b"ka", b"kb", b"kc",
        b"kd", b"ke", b"kf", b"kg",
    ];
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            if slot(a) == slot(b) {
                return (a, b);
            }
        }
    }
    unreachable!("17 keys in 16 slots always collide")
}

#[test]
fn two_workers_making_the_same_key_share_one_record() {
    loom::model(|| {
        let region = region();
        let a = insert_and_count(&region, b"same key", 1);
        let b = insert_and_count(&region, b"same key", 2);
        assert_eq!(a.join().unwrap(), b.join().unwrap());

        let table = Table::attach(&region, 0).unwrap();
        assert_eq!(table.records().count(), 1);
        assert_eq!(load_i64(&table.lookup(b"same key").unwrap().cells()[0]), 2);
        assert_eq!(table.stats().records, 1);
    });
}

#[test]
fn keys_racing_for_one_slot_both_land() {
    let (first, second) = colliding_keys();
    loom::model(move || {
        let region = region();
        let a = insert_and_count(&region, first, 1);
        let b = insert_and_count(&region, second, 2);
        assert_ne!(a.join().unwrap(), b.join().unwrap());

        let table = Table::attach(&region, 0).unwrap();
        for key in [first, second] {
            assert_eq!(load_i64(&table.lookup(key).unwrap().cells()[0]), 1);
        }
        assert_eq!(table.records().count(), 2);
    });
}

/// A sync keeps the records one scan of the index found while the table's
/// records mark stays as it was before that scan: a record published
/// meanwhile is either in the scan or moves the mark (else its counts
/// would never reach the dict).
#[test]
fn a_records_mark_unchanged_since_before_a_scan_means_the_scan_saw_every_record() {
    loom::model(|| {
        let region = region();
        let inserter = insert_and_count(&region, b"new key", 1);
        let table = Table::attach(&region, 0).unwrap();
        let before = table.records_mark();
        let scanned = table.records().count();
        inserter.join().unwrap();
        let after = table.records_mark();
        assert!(after.is_some());
        if before == after {
            assert_eq!(scanned, 1, "a record the scan missed, mark {:?}", before);
        }
    });
}

/// A count made before a sync's ticket is in a sync begun after it, also
/// when that sync keeps the records of an earlier scan: its key was made
/// before, so the mark moved, or it was in that scan.
#[test]
fn a_sync_begun_after_a_ticket_lists_the_key_counted_before_it() {
    loom::model(|| {
        let region = region();
        let table = Table::attach(&region, 0).unwrap();
        // The sync's list from an earlier scan: the empty table's.
        let kept = table.records_mark();
        let progress_word = Arc::new(AtomicU64::new(0));
        let counting = {
            let region = Arc::clone(&region);
            let progress_word = Arc::clone(&progress_word);
            thread::spawn(move || {
                let table = Table::attach(&region, 0).unwrap();
                let (record, _) = table.get_or_insert_by(b"k", 2, &worker(1)).unwrap();
                add_i64(&record.cells()[0], 1).unwrap();
                SyncProgress::new(&*progress_word).ticket()
            })
        };
        let progress = SyncProgress::new(&*progress_word);
        let number = progress.begin();
        let mark = table.records_mark();
        let listed = if mark.is_some() && mark == kept {
            0
        } else {
            table
                .records()
                .filter(|record| load_i64(&record.cells()[0]) == 1)
                .count()
        };
        let ticket = counting.join().unwrap();
        if ticket < number {
            assert_eq!(listed, 1, "began after the ticket, mark {:?}", mark);
        }
    });
}

#[test]
fn a_reader_sees_no_record_or_a_whole_one() {
    loom::model(|| {
        let region = region();
        let writer = insert_and_count(&region, b"a key of 17 bytes", 1);
        let reader = {
            let region = Arc::clone(&region);
            thread::spawn(move || {
                let table = Table::attach(&region, 0).unwrap();
                for record in table.records() {
                    let mut key = Vec::new();
                    record.key_into(&mut key);
                    assert_eq!(key, b"a key of 17 bytes");
                    assert_eq!(record.width(), 2);
                }
                if let Some(record) = table.lookup(b"a key of 17 bytes") {
                    assert!(load_i64(&record.cells()[0]) <= 1);
                }
            })
        };
        writer.join().unwrap();
        reader.join().unwrap();
    });
}

#[test]
fn a_dead_holders_lock_goes_to_exactly_one_waiter() {
    const DEAD: Holder = Holder {
        pid: 10,
        instance: 1,
    };
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicU64::new(0));
        try_lock(&*word, DEAD, |_| true).unwrap();
        let waiters: Vec<_> = [20u32, 30]
            .iter()
            .map(|&pid| {
                let (word, inside) = (Arc::clone(&word), Arc::clone(&inside));
                thread::spawn(move || {
                    let me = Holder { pid, instance: 1 };
                    let got = try_lock(&*word, me, |pid| pid != DEAD.pid);
                    if got.is_ok() {
                        assert_eq!(inside.fetch_add(1, Relaxed), 0, "two holders");
                        inside.fetch_sub(1, Relaxed);
                        assert!(unlock(&*word, me));
                    }
                    got
                })
            })
            .collect();
        let results: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        // One takes it over from the dead; the other finds it held by the
        // winner, or free once the winner let it go.
        let takeovers = results
            .iter()
            .filter(|r| **r == Ok(Taken::FromDead(DEAD)))
            .count();
        assert_eq!(takeovers, 1, "{:?}", results);
        assert_eq!(holder(&*word), None);
    });
}

#[test]
fn two_holders_never_hold_the_lock_at_once() {
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = [1u32, 2]
            .iter()
            .map(|&pid| {
                let (word, inside) = (Arc::clone(&word), Arc::clone(&inside));
                thread::spawn(move || {
                    let me = Holder { pid, instance: 1 };
                    if try_lock(&*word, me, |_| true).is_ok() {
                        assert_eq!(inside.fetch_add(1, Relaxed), 0, "two holders");
                        inside.fetch_sub(1, Relaxed);
                        assert!(unlock(&*word, me));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    });
}

/// Two keys whose probes collide, both in the table, the first before the
/// second in their run.
fn region_with(keys: &[&'static [u8]]) -> Arc<Vec<AtomicU64>> {
    let region = region();
    let table = Table::attach(&region, 0).unwrap();
    for key in keys {
        table.get_or_insert_by(key, 2, &worker(99)).unwrap();
    }
    region
}

/// Removes `key` in a thread of its own: whether it was there.
fn remove(region: &Arc<Vec<AtomicU64>>, key: &'static [u8]) -> thread::JoinHandle<bool> {
    let region = Arc::clone(region);
    thread::spawn(move || {
        let table = Table::attach(&region, 0).unwrap();
        table.remove_if(key, &worker(1), |_| true).unwrap()
    })
}

#[test]
fn a_removal_never_hides_a_key_further_on_in_its_run() {
    let (first, second) = colliding_keys();
    loom::model(move || {
        let region = region_with(&[first, second]);
        let remover = remove(&region, first);
        let table = Table::attach(&region, 0).unwrap();
        // A lookup during the removal: the other key is always there; the
        // removed one whole (its own key) or gone.
        let found = table.lookup(second).unwrap();
        let mut key = Vec::new();
        found.key_into(&mut key);
        assert_eq!(key, second);
        if let Some(record) = table.lookup(first) {
            let mut key = Vec::new();
            record.key_into(&mut key);
            assert_eq!(key, first);
        }
        assert!(remover.join().unwrap());
        assert!(table.lookup(first).is_none());
        assert!(table.lookup(second).is_some());
    });
}

#[test]
fn a_removal_racing_a_new_record_of_the_key_leaves_one_record() {
    let (first, second) = colliding_keys();
    loom::model(move || {
        // The key sits before another in its run: its removal leaves a
        // tombstone, which the new record may take.
        let region = region_with(&[first, second]);
        let remover = remove(&region, first);
        let maker = {
            let region = Arc::clone(&region);
            thread::spawn(move || {
                let table = Table::attach(&region, 0).unwrap();
                let (record, made) = table.get_or_insert_by(first, 2, &worker(2)).unwrap();
                (record.offset(), made)
            })
        };
        assert!(remover.join().unwrap());
        let (offset, made) = maker.join().unwrap();
        let table = Table::attach(&region, 0).unwrap();
        let records_of_first = table
            .records()
            .filter(|record| {
                let mut key = Vec::new();
                record.key_into(&mut key);
                key == first
            })
            .count();
        // Made after the removal: the one record; found before it: removed
        // with it.
        assert_eq!(records_of_first, usize::from(made));
        assert_eq!(
            table.lookup(first).map(|r| r.offset()),
            made.then_some(offset)
        );
        assert!(table.lookup(second).is_some());
        let stats = table.stats();
        assert_eq!(stats.records, 1 + u64::from(made));
    });
}

/// What a worker does per request with a record's cells it keeps: check
/// the epoch it kept with them, look the key up again (making it) when it
/// moved, add 1. `busy` is up from before the check until after the add:
/// the model's stand-in for the grace period (a remover reuses a record
/// only once every write that checked before its removal is done, as the
/// 10 seconds ensure for any worker that is not stopped).
fn count_with_epoch_check(
    table: &Table<'_, AtomicU64>,
    kept: (usize, u64),
    key: &'static [u8],
    busy: &AtomicU64,
    me: &Worker,
) {
    busy.store(1, SeqCst);
    fence(SeqCst);
    let (mut offset, epoch) = kept;
    if table.epoch() != epoch {
        offset = table.get_or_insert_by(key, 2, me).unwrap().0.offset();
    }
    let record = table.record_in_arena(offset as u32);
    add_i64(&record.cells()[0], 1).unwrap();
    busy.store(0, SeqCst);
}

#[test]
fn a_stale_writer_never_counts_in_the_key_that_reuses_its_record() {
    loom::model(|| {
        let region = region_with(&[b"old"]);
        let busy = Arc::new(AtomicU64::new(0));
        let kept = {
            let table = Table::attach(&region, 0).unwrap();
            let epoch = table.epoch();
            (table.lookup(b"old").unwrap().offset(), epoch)
        };
        let remover = {
            let (region, busy) = (Arc::clone(&region), Arc::clone(&busy));
            thread::spawn(move || {
                let table = Table::attach(&region, 0).unwrap();
                let me = worker(1);
                table.remove_if(b"old", &me, |_| true).unwrap();
                fence(SeqCst);
                while busy.load(SeqCst) != 0 {
                    thread::yield_now();
                }
                // The grace period is over: "new" (the same size) takes the
                // removed record's space.
                let later = Worker {
                    pid: 1,
                    now: GRACE_SECONDS,
                };
                let (record, made) = table.get_or_insert_by(b"new", 2, &later).unwrap();
                assert!(made);
                record.offset()
            })
        };
        let table = Table::attach(&region, 0).unwrap();
        count_with_epoch_check(&table, kept, b"old", &busy, &worker(2));
        let new_offset = remover.join().unwrap();
        let new = table.lookup(b"new").unwrap();
        assert_eq!(new.offset(), new_offset);
        assert_eq!(load_i64(&new.cells()[0]), 0, "a stale write in the new key");
        // The write counted in the old record (removed with it) or in the
        // record "old" got again; "new" reused the old record either way.
        assert_eq!(table.stats().reused, 1);
    });
}
