//! Every interleaving of the engine's lock-free paths, under loom's model
//! of the C++/Rust memory model (Relaxed stores may be seen late, only
//! Release/Acquire pairs order them).

use std::hash::Hasher;
use std::sync::atomic::Ordering::Relaxed;

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;
use siphasher::sip::SipHasher13;

use resty_counter_loom::cell::{add_i64, load_i64};
use resty_counter_loom::lock::{holder, try_lock, unlock, Holder, Taken};
use resty_counter_loom::table::{Table, MIN_WORDS};

const SEED: [u64; 2] = [1, 2];

fn region() -> Arc<Vec<AtomicU64>> {
    let words: Vec<AtomicU64> = (0..MIN_WORDS).map(|_| AtomicU64::new(0)).collect();
    Table::init(&words, SEED, 0).unwrap();
    Arc::new(words)
}

/// Inserts `key` in a thread of its own, adds 1 to its first cell, and
/// returns the record's offset.
fn insert_and_count(region: &Arc<Vec<AtomicU64>>, key: &'static [u8]) -> thread::JoinHandle<usize> {
    let region = Arc::clone(region);
    thread::spawn(move || {
        let table = Table::attach(&region, 0).unwrap();
        let (record, _) = table.get_or_insert(key, 2).unwrap();
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
        let a = insert_and_count(&region, b"same key");
        let b = insert_and_count(&region, b"same key");
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
        let a = insert_and_count(&region, first);
        let b = insert_and_count(&region, second);
        assert_ne!(a.join().unwrap(), b.join().unwrap());

        let table = Table::attach(&region, 0).unwrap();
        for key in [first, second] {
            assert_eq!(load_i64(&table.lookup(key).unwrap().cells()[0]), 1);
        }
        assert_eq!(table.records().count(), 2);
    });
}

#[test]
fn a_reader_sees_no_record_or_a_whole_one() {
    loom::model(|| {
        let region = region();
        let writer = insert_and_count(&region, b"a key of 17 bytes");
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
