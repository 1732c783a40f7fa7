//! A worker's records merged into whatever the dict holds: latencies and
//! stored bytes from the input. Never panics; a merged record decodes and
//! holds the stored count plus the recorded one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::histogram::Histogram;
use resty_counter_core::requests::RequestStore;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (data[0] as usize * 8).min(data.len() - 1);
    let (latencies, stored) = data[1..].split_at(split.min(data.len() - 1));
    let mut store = RequestStore::new();
    let slot = store.alloc().unwrap();
    let mut recorded = 0u64;
    for chunk in latencies.chunks_exact(8) {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(chunk);
        // The shim only passes finite values >= 0; the core copes anyway.
        store.record(slot, f64::from_le_bytes(raw)).unwrap();
        recorded += 1;
    }
    let before = Histogram::decode(stored);
    match store.merge_into(slot, stored) {
        Ok(merged) => {
            let merged = Histogram::decode(merged).expect("merged record decodes");
            let before = before.expect("stored record was valid");
            assert_eq!(merged.count, before.count.saturating_add(recorded));
        }
        Err(_) => assert!(before.is_err()),
    }
    store.release(slot).unwrap();
    assert_eq!(store.pending(), 0);
});
