//! The request counter's key admission past `max_keys`
//! (src/engine/heavy.rs) under arbitrary keys, caps, seconds and region
//! sizes, checked against a model of what was sent: every request is in
//! a record (its key's or the overflow key's: the sum of counts is the
//! requests made), a key's record never counts more than the key was sent
//! (admitted keys count from their admission), at most `max_keys` keys
//! are tracked and the key count says how many, only tracked keys have an
//! error record, and evictions stay within their number a second.
#![no_main]

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::heavy::{self, key_record, Refused, EVICTIONS_PER_SECOND};
use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::requests::{self, Layout, Requests, Roller};
use resty_counter_core::engine::table::{Owner, Table, MIN_WORDS};
use resty_counter_core::histogram::PROMETHEUS_EDGES_MS;

const OVERFLOW: &[u8] = b"r_overflow";

#[path = "common/clock.rs"]
mod clock;

use clock::Clock;

impl Roller for Clock {
    fn me(&self) -> Holder {
        Owner::me(self)
    }

    fn alive(&self, _: u32) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let layout = Layout::new(1, false).unwrap();
    // Arenas from too small for a sketch (none: nothing is admitted) to
    // one of 128 columns; caps of 1 to 16 keys.
    let words = MIN_WORDS + 64 * usize::from(data[0] % 160);
    let max_keys = u64::from(data[1] % 16) + 1;
    let region: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let table = Table::init(&region, [u64::from(data[2]), 5], 3).unwrap();
    let clock = Clock(Cell::new(0));
    let overflow = match table.get_or_insert(OVERFLOW, layout.width()) {
        Ok((record, _)) => record,
        Err(_) => return,
    };
    let mut sent: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut requests_made = 0u64;
    let mut evicted_in_second = (0u64, 0u64);

    for &byte in &data[3..] {
        // A byte: a key of 32 (the high bits: a few hot, many rare), or
        // the clock moving on a second (0xFF).
        if byte == 0xFF {
            clock.0.set(clock.0.get() + 1);
            continue;
        }
        let key = format!("rk{}", byte % 32).into_bytes();
        let before = heavy::existing_sketch(&table).map_or(0, |s| s.figures().evicted);
        let refused = Refused {
            key: &key,
            overflow: OVERFLOW,
            layout,
            edges_ms: &PROMETHEUS_EDGES_MS,
            max_keys,
            second: clock.0.get(),
        };
        let own = match key_record(&table, &clock, &clock, &refused) {
            Ok(own) => own,
            // No room in the engine: the overflow key, as the Lua side does.
            Err(_) => None,
        };
        let cells = own.as_ref().unwrap_or(&overflow).cells();
        Requests::new(cells, layout).unwrap().record(clock.0.get(), 1.0, &clock);
        *sent.entry(key).or_default() += 1;
        requests_made += 1;

        let after = heavy::existing_sketch(&table).map_or(0, |s| s.figures().evicted);
        assert!(after - before <= 1);
        if evicted_in_second.0 != clock.0.get() {
            evicted_in_second = (clock.0.get(), 0);
        }
        evicted_in_second.1 += after - before;
        assert!(evicted_in_second.1 <= EVICTIONS_PER_SECOND);
    }

    let mut counted = 0;
    let mut tracked = 0;
    let mut name = Vec::new();
    for record in table.records() {
        name.clear();
        record.key_into(&mut name);
        if record.width() != layout.width() || !requests::is_request_key(&name) {
            continue;
        }
        let count = Requests::new(record.cells(), layout).unwrap().count();
        counted += count;
        if name != OVERFLOW {
            tracked += 1;
            assert!(count <= sent[&name], "{:?}", name);
        }
    }
    assert_eq!(counted, requests_made);
    assert!(tracked <= max_keys);
    let keys = table
        .lookup(requests::KEYS_KEY)
        .map_or(0, |r| r.cells()[0].load(Relaxed));
    assert_eq!(keys, tracked);
    let mut errors = Vec::new();
    heavy::figures(&table, &mut errors);
    for (key, _) in errors {
        let mut full = b"r".to_vec();
        full.extend_from_slice(&key);
        assert!(table.lookup(&full).is_some(), "{:?}", key);
    }
});
