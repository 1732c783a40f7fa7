//! resty.counter's pending store under arbitrary operations, checked
//! against a model in i128: integer sums are exact or refused, never
//! wrapped, and a drain returns exactly what was added.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::pending::{DeltaStatus, PendingStore, MAX_SAFE_INTEGER};

fuzz_target!(|data: &[u8]| {
    let mut store = PendingStore::new();
    let mut model: Vec<Option<i128>> = Vec::new();
    for op in data.chunks(9) {
        match op[0] % 4 {
            0 => {
                if let Ok(slot) = store.alloc() {
                    let slot = slot as usize;
                    if model.len() <= slot {
                        model.resize(slot + 1, None);
                    }
                    model[slot] = Some(0);
                }
            }
            1 | 2 if op.len() == 9 => {
                if model.is_empty() {
                    continue;
                }
                let slot = (op[1] as usize) % model.len();
                let mut raw = [0u8; 8];
                raw[..7].copy_from_slice(&op[2..9]);
                let step = i64::from_le_bytes(raw) >> (op[0] % 64);
                let result = store.add(slot as u32, step, 0.0);
                match model[slot] {
                    Some(sum) => {
                        let next = sum + i128::from(step);
                        if next > i128::from(i64::MAX) || next < i128::from(i64::MIN) {
                            assert!(result.is_err(), "int64 overflow accepted");
                        } else {
                            assert!(result.is_ok());
                            model[slot] = Some(next);
                        }
                    }
                    None => assert!(result.is_err(), "a free slot took a step"),
                }
            }
            _ => {
                let drained = store.drain();
                for delta in drained {
                    let expected = model[delta.slot as usize]
                        .take()
                        .expect("drained a free slot");
                    assert_eq!(i128::from(delta.integer), expected);
                    let exact = expected.abs() <= i128::from(MAX_SAFE_INTEGER);
                    assert_eq!(delta.status == DeltaStatus::Ok as i32, exact);
                }
                assert!(model.iter().all(Option::is_none), "a slot was not drained");
            }
        }
    }
});
