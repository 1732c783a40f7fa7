//! Bytes from the shared dict (anyone can write there): decoding never
//! panics, and what decodes re-encodes to a record that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::histogram::Histogram;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Histogram::decode(data) {
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        let again = Histogram::decode(&bytes).expect("re-encoded record decodes");
        assert_eq!(again, h);
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            let p = h.percentile(q);
            assert!(p >= 0.0 && p <= h.max.max(0.0), "p{} = {} > max {}", q, p, h.max);
        }
        let _ = h.mean();
        let _ = h.count_at_or_below(0.005);
    }
});
