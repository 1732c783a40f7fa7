//! The C ABI with arbitrary arguments (slots, lengths, bytes, numbers), as
//! a buggy shim could pass them: error codes, never a panic or a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::ffi::*;
use std::ptr;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    unsafe {
        assert_eq!(
            rc_utf8_valid(data.as_ptr(), data.len()) == 1,
            std::str::from_utf8(data).is_ok()
        );

        let store = rc_requests_new();
        let slot = u32::from(data[0] % 4);
        rc_requests_alloc(store);
        rc_requests_record(store, slot, f64::from(data[1]) - 3.0);
        let (mut out, mut out_len) = (ptr::null(), 0usize);
        rc_requests_merge(store, slot, data.as_ptr(), data.len(), &mut out, &mut out_len);
        rc_requests_release(store, u32::from(data[2]));
        rc_requests_free(store);

        let report = rc_report_new(u32::from(data[3]), f64::from(data[1]) * 1e7, u32::from(data[2]));
        rc_report_add_key(report, data.as_ptr(), data.len());
        rc_report_put(report, u32::from(data[0] % 2), i32::from(data[1] as i8), data.as_ptr(), data.len());
        let mut len = 0usize;
        rc_report_json(report, 1.0, 2.0, i32::from(data[2] % 2), &mut len);
        rc_report_prometheus(report, data.as_ptr(), data.len(), &mut len);
        rc_report_free(report);

        let pending = rc_store_new();
        let mut slots = ptr::null_mut();
        rc_store_alloc(pending, &mut slots);
        rc_store_add(pending, u32::from(data[0] % 3), i64::from(data[1]) << 56, f64::from(data[2]));
        let mut count = 0u32;
        rc_store_drain(pending, &mut count);
        rc_store_free(pending);
    }
});
