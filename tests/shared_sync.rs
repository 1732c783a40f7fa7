//! resty.counter's sync across processes, as nginx workers run it: forked
//! processes make counter keys as they go, count into them and into keys
//! they share, remove some and make them again, and some are killed with
//! SIGKILL at arbitrary points (mid-insert included, leaving the table
//! lock to a dead holder); meanwhile the parent syncs over and over, into
//! a dict of its own, with the sync nginx runs (`rc_counter_sync_begin`:
//! it keeps the records of its last scan of the index while the table's
//! records stay as they were).
//!
//! Once every child has ended, one more sync leaves the dict holding every
//! counter's value: a record a sync's kept list missed would keep its
//! counts out of the dict.
//!
//! One test in this file: fork() is only safe with no other test threads
//! running.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod common;
use common::{assert_ended, record_of, shared_words, Worker};

use resty_counter_core::engine::counter::{Counter, KIND, WIDTH};
use resty_counter_core::engine::table::Table;
use resty_counter_core::engine::Error;
use resty_counter_core::ffi_engine::{
    rc_counter_import_base, rc_counter_mirrored, rc_counter_sync_end, rc_counter_value,
    sync_listing, Engine, NEEDS_BASE,
};

const PROCESSES: usize = 4;
const SHARED_KEYS: usize = 8;
const OWN_KEYS: usize = 3000;
const OPS: u64 = 300_000;
const REGION_WORDS: usize = 1 << 19;

/// A counter key as the table knows it: the kind byte first.
fn counter_key(name: String) -> Vec<u8> {
    let mut key = vec![KIND];
    key.extend_from_slice(name.as_bytes());
    key
}

/// This process as an nginx worker, on the real clock: removed records
/// are not reused while the test runs (the 10 s grace period).
const WORKER: Worker = Worker { ms_clock: false };

/// A child's life: OPS adds, on shared keys, on its own keys (made one
/// after the other as it goes: new records all the while), and one in 64
/// followed by the removal of the key counted (made again by a later add).
/// `progress` counts its adds.
fn child(table: &Table<AtomicU64>, keys: &[Vec<u8>], progress: &AtomicU64) -> ! {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ progress as *const _ as u64;
    for op in 0..OPS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let made = SHARED_KEYS + (op as usize * OWN_KEYS / OPS as usize);
        let key = &keys[(state >> 8) as usize % (made + 1)];
        if Counter::new(record_of(table, key, WIDTH, &WORKER).cells())
            .add(1)
            .is_err()
        {
            unsafe { libc::_exit(4) }
        }
        if (state >> 4) % 64 == 0 {
            loop {
                match table.remove_if(key, &WORKER, |_| true) {
                    Ok(_) => break,
                    Err(Error::Busy) => continue,
                    Err(_) => unsafe { libc::_exit(6) },
                }
            }
        }
        progress.fetch_add(1, Relaxed);
    }
    unsafe { libc::_exit(0) }
}

/// One sync into `dict` as the Lua side finishes it: a key's first sync
/// imports the dict's value (none here: 0) as its base.
fn sync(engine: &mut Engine, dict: &mut HashMap<Vec<u8>, f64>) {
    let (rc, changes) = unsafe { sync_listing(engine, 0) };
    assert_eq!(rc, 0, "the only syncer");
    for change in changes {
        let key = unsafe { std::slice::from_raw_parts(change.key, change.key_len as usize) };
        let value = if change.status == NEEDS_BASE {
            unsafe {
                rc_counter_import_base(change.cells, 0.0);
                rc_counter_value(change.cells)
            }
        } else {
            assert_eq!(change.status, 0, "{:?}", String::from_utf8_lossy(key));
            change.value
        };
        dict.insert(key.to_vec(), value);
        unsafe { rc_counter_mirrored(change.cells, value) };
    }
    assert_eq!(unsafe { rc_counter_sync_end(engine) }, 1);
}

#[test]
fn a_sync_after_every_count_leaves_every_counters_value_in_the_dict() {
    let words = shared_words(REGION_WORDS);
    let table = Table::init(words, [3, 5], 0).unwrap();
    let keys: Vec<Vec<Vec<u8>>> = (0..PROCESSES)
        .map(|p| {
            (0..SHARED_KEYS)
                .map(|i| counter_key(format!("shared-{}", i)))
                .chain((0..OWN_KEYS).map(|i| counter_key(format!("own-{}-{}", p, i))))
                .collect()
        })
        .collect();
    let progress = shared_words(PROCESSES);
    let mut pids = Vec::new();
    for (process, keys) in keys.iter().enumerate() {
        match unsafe { libc::fork() } {
            0 => child(&table, keys, &progress[process]),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    let mut engine = Engine::over(Table::attach(words, 0).unwrap());
    let mut dict = HashMap::new();
    sync(&mut engine, &mut dict);
    // The library's panic hook (installed by the sync) keeps panics quiet
    // for nginx's log: this test's failures are reported as usual.
    drop(std::panic::take_hook());
    let mut running: Vec<usize> = (0..PROCESSES).collect();
    let mut syncs = 0;
    while !running.is_empty() {
        sync(&mut engine, &mut dict);
        syncs += 1;
        running.retain(|&process| {
            let pid = pids[process];
            let mut status = 0;
            // Every other process is killed at its own point of the run.
            let at = OPS * (process as u64 + 1) / (PROCESSES as u64 + 1);
            if process % 2 == 1 && progress[process].load(Relaxed) >= at {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert_ended(process, status, true);
                return false;
            }
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                assert_ended(process, status, false);
                return false;
            }
            true
        });
    }
    sync(&mut engine, &mut dict);

    let mut counters = 0;
    let mut key = Vec::new();
    for record in table.records() {
        key.clear();
        record.key_into(&mut key);
        let counter = Counter::new(record.cells());
        assert_eq!(
            dict.get(&key[1..]).copied(),
            Some(counter.value()),
            "{:?}",
            String::from_utf8_lossy(&key)
        );
        counters += 1;
    }
    assert!(
        counters > PROCESSES * OWN_KEYS / 2 && syncs > 10,
        "{} counters, {} syncs",
        counters,
        syncs
    );
}
