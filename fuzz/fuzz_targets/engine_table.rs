//! The shared engine's key table under arbitrary keys, widths, adds,
//! removals, a clock moving on and region sizes, checked against a
//! HashMap: a key is found once made, with its width and its sum (0 when
//! made again after its removal, in a reused record or not); a removed key
//! is absent; a refused key (full) is absent; a key of another width is
//! refused without harm; the listing is exactly the model; the figures
//! (records, removed, reused, free) add up.
#![no_main]

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::cell::{add_i64, load_i64};
use resty_counter_core::engine::table::{Table, MIN_WORDS};
use resty_counter_core::engine::Error;

#[path = "common/clock.rs"]
mod clock;

use clock::Clock;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // 208 to about 2,250 words: small enough that tables fill up.
    let words = MIN_WORDS + usize::from(u16::from_le_bytes([data[0], data[1]]) % 2048);
    let region: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(u64::MAX)).collect();
    let table = Table::init(&region, [u64::from(data[0]), 3], 9).unwrap();
    let mut model: HashMap<Vec<u8>, (u32, i64)> = HashMap::new();
    let clock = Clock(Cell::new(0));
    let mut removed = 0;

    let mut rest = &data[2..];
    while rest.len() >= 3 {
        let (op, len, width) = (
            rest[0],
            usize::from(rest[1] % 40),
            u32::from(rest[2] % 4) + 1,
        );
        rest = &rest[3..];
        let key = rest[..len.min(rest.len())].to_vec();
        rest = &rest[key.len()..];
        // The clock moves on by 0 to 7 seconds an operation.
        clock.0.set(clock.0.get() + u64::from(op >> 5));
        match op % 4 {
            0 => {
                assert_eq!(
                    table.lookup(&key).map(|r| r.width()),
                    model.get(&key).map(|m| m.0)
                );
                continue;
            }
            1 => {
                let epoch = table.epoch();
                let gone = table.remove_if(&key, &clock, |_| true).unwrap();
                assert_eq!(gone, model.remove(&key).is_some());
                removed += u64::from(gone);
                assert_eq!(table.epoch(), epoch + u64::from(gone));
                assert!(table.lookup(&key).is_none());
                continue;
            }
            _ => {}
        }
        match (
            table.get_or_insert_by(&key, width, &clock),
            model.get(&key).copied(),
        ) {
            (Ok((record, made)), known) => {
                assert_eq!(made, known.is_none());
                assert_eq!(record.width(), width);
                let step = i64::from(op) - 128;
                let sum = add_i64(&record.cells()[0], step).unwrap();
                let entry = model.entry(key).or_insert((width, 0));
                entry.1 += step;
                assert_eq!(sum, entry.1);
            }
            (Err(Error::WidthMismatch { found }), Some((kept, _))) => {
                assert_ne!(kept, width);
                assert_eq!(found, kept);
            }
            (Err(Error::Full), None) => {}
            (other, known) => panic!("{:?} for a key the model has as {:?}", other.err(), known),
        }
    }

    let mut listed = 0;
    let mut key = Vec::new();
    for record in table.records() {
        key.clear();
        record.key_into(&mut key);
        let (width, sum) = model[&key];
        assert_eq!(record.width(), width);
        assert_eq!(load_i64(&record.cells()[0]), sum);
        listed += 1;
    }
    assert_eq!(listed, model.len());
    let stats = table.stats();
    assert_eq!(stats.records, model.len() as u64);
    assert_eq!(stats.removed, removed);
    assert!(stats.reused <= removed && stats.free <= removed - stats.reused);
    assert!(stats.tombstones + stats.records <= stats.max_records);
    assert!(Table::attach(&region, 9).is_ok());
});
