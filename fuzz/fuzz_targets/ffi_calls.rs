//! The C ABI with arbitrary arguments (slots, lengths, bytes, numbers), as
//! a buggy shim could pass them: error codes, never a panic or a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::requests::Layout;
use resty_counter_core::histogram::{MAX_EDGES, PROMETHEUS_EDGES_MS};
use resty_counter_core::ffi::*;
use resty_counter_core::ffi_engine::{rc_requests_record, rc_requests_report, RequestsShape};
use resty_counter_core::ffi_int::*;
use resty_counter_core::int64::MAX_TEXT_LEN;
use std::ptr;
use std::sync::atomic::AtomicU64;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    unsafe {
        assert_eq!(
            rc_utf8_valid(data.as_ptr(), data.len()) == 1,
            std::str::from_utf8(data).is_ok()
        );

        // The request path: a record of a ring the bytes choose, windows
        // and latencies from the bytes; null and bad rings refused.
        let ring = u32::from(data[0] % 4) + 1;
        let histogram = i32::from(data[0] & 4 != 0);
        let layout = Layout::new(ring as usize, histogram != 0).unwrap();
        let cells: Vec<AtomicU64> = (0..layout.width()).map(|_| AtomicU64::new(0)).collect();
        let window = u64::from_le_bytes([data[1], data[2], data[3], 0, 0, 0, 0, data[0]]);
        let latency = f64::from(data[1]) - 3.0;
        let mut shape = RequestsShape {
            ring,
            histogram,
            edges: PROMETHEUS_EDGES_MS.len() as u32,
            reserved: 0,
            edges_ms: [0.0; MAX_EDGES],
        };
        shape.edges_ms[..PROMETHEUS_EDGES_MS.len()].copy_from_slice(&PROMETHEUS_EDGES_MS);
        assert!(rc_requests_record(cells.as_ptr(), &shape, window, latency) >= 0);
        assert!(rc_requests_record(ptr::null(), &shape, window, latency) < 0);
        assert!(rc_requests_record(cells.as_ptr(), ptr::null(), window, latency) < 0);
        for (ring, edges) in [(0, 11), (200, 11), (ring, 0), (ring, 33)] {
            let bad = RequestsShape {
                ring,
                edges,
                ..shape
            };
            assert!(rc_requests_record(cells.as_ptr(), &bad, window, latency) < 0);
        }
        let edges = PROMETHEUS_EDGES_MS.as_ptr();
        let n = PROMETHEUS_EDGES_MS.len() as u32;
        assert!(rc_requests_report(
            ptr::null_mut(),
            ring,
            histogram,
            edges,
            n,
            60,
            1.0,
            data.as_ptr(),
            data.len(),
            1
        )
        .is_null());
        rc_report_free(ptr::null_mut());

        let pending = rc_store_new();
        let mut slots = ptr::null_mut();
        rc_store_alloc(pending, &mut slots);
        rc_store_add(
            pending,
            u32::from(data[0] % 3),
            i64::from(data[1]) << 56,
            f64::from(data[2]),
        );
        let mut count = 0u32;
        rc_store_drain(pending, &mut count);
        rc_store_free(pending);

        // The int64 ABI: stored text and codes from anywhere.
        let mut result = std::mem::zeroed::<IntResult>();
        let op = i32::from(data[0]) - 2;
        let cmp = i32::from(data[1]) - 2;
        rc_int_apply(
            data.as_ptr(),
            data.len(),
            op,
            cmp,
            i64::from(data[2]),
            i64::from(data[3]) << 60,
            &mut result,
        );
        rc_int_apply(ptr::null(), 0, op, cmp, 0, 1, ptr::null_mut());
        rc_int_apply_i64(i64::MAX, op, cmp, 0, i64::from(data[3]), &mut result);
        let mut parsed = 0i64;
        rc_int_parse(data.as_ptr(), data.len(), &mut parsed);
        rc_int_parse(data.as_ptr(), data.len(), ptr::null_mut());
        let mut text = [0u8; MAX_TEXT_LEN];
        rc_int_format(parsed, &mut text);
        rc_int_format(parsed, ptr::null_mut());
        let f = f64::from(data[1]) - 100.0;
        rc_sliding_estimate(f, f * 2.0, f / 3.0, f64::from(data[2]));
        rc_sliding_wait(f, f, f, f64::from(data[3]) - 1.0, f);
    }
});
