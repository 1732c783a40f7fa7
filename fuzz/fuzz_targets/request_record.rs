//! Requests recorded into an engine request record (one process, no
//! race): arbitrary rings, windows and latencies against a model of the
//! ring. Never panics; the total counts every request, and each window
//! reads exactly what the model says its slot holds.
#![no_main]

use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::requests::{Layout, Recorded, Requests, Roller};

struct Alone;

impl Roller for Alone {
    fn me(&self) -> Holder {
        Holder {
            pid: 1,
            instance: 1,
        }
    }
    fn alive(&self, _: u32) -> bool {
        true
    }
    fn pause(&self, _: u32) {}
    fn spins(&self) -> u32 {
        0
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let ring = usize::from(data[0] % 4) + 1;
    let layout = Layout::new(ring, data[0] & 4 != 0).expect("a ring of 1 to 4");
    let cells: Vec<AtomicU64> = (0..layout.width()).map(|_| AtomicU64::new(0)).collect();
    let record = Requests::new(&cells, layout).expect("a record of its width");
    // The model: per slot, the window it holds and its count.
    let mut slots = vec![None::<(u64, u64)>; ring];
    let mut total = 0u64;
    for chunk in data[1..].chunks_exact(9) {
        let window = u64::from(chunk[0] % 12);
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&chunk[1..]);
        // The shim only passes finite values >= 0; the core copes anyway.
        let recorded = record.record(window, f64::from_le_bytes(raw), &Alone);
        total += 1;
        let slot = &mut slots[window as usize % ring];
        let expected = match *slot {
            Some((held, count)) if held == window => {
                *slot = Some((held, count + 1));
                Recorded::Window
            }
            Some((held, _)) if held > window => Recorded::TotalOnly,
            _ => {
                *slot = Some((window, 1));
                Recorded::Window
            }
        };
        assert_eq!(recorded, expected);
    }
    assert_eq!(record.total().count, total);
    for window in 0..12u64 {
        let model = match slots[window as usize % ring] {
            Some((held, count)) if held == window => Some(count),
            _ => None,
        };
        let got = record.window(window);
        assert_eq!(got.as_ref().map(|h| h.count), model);
        if let Some(h) = got {
            assert_eq!(h.has_buckets(), layout.has_histogram());
            assert!(h.sum.is_finite() && h.max.is_finite());
            let p99 = h.percentile(0.99);
            assert!(p99 <= h.max, "{} > {}", p99, h.max);
        }
    }
});
