//! The C ABI that LuaJIT calls through `ffi.cdef` on the hot and sync paths.
//!
//! Every function here is a thin wrapper over [`crate::pending`]: it checks
//! its pointers, catches any panic (a panic unwinding into nginx would abort
//! the worker) and reports failures as negative [`Error`] codes. The
//! declarations Lua uses are in `lua/resty/counter/abi.lua` (checked by
//! `tests/lua_abi.rs`); change both together and bump [`ABI_VERSION`].

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::error::Error;
use crate::pending::{Delta, PendingStore, Slot};
use crate::stats::{EngineMemory, KeyInfo, Report};

/// The version of the layout and signatures below. The Lua side refuses to
/// run against a library whose version differs from the one it declares.
pub const ABI_VERSION: i32 = 3;

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
}

/// Replaces the default panic hook, which would print raw text to stderr
/// (nginx's error log), with one that keeps the message for the Lua side to
/// log properly. Idempotent.
///
/// `std::sync::Once` is all this needs, and has been in std since 1.0;
/// `once_cell` (or std's `OnceLock`, which needs rustc 1.70 while we build
/// on Debian 12's 1.63) would only matter for a lazily built value.
pub fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
            // Unit tests keep the default report for their own failures.
            if cfg!(test) && !IN_GUARD.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// The message of the last panic caught in this thread, once.
pub fn take_panic_message() -> Option<String> {
    LAST_PANIC.with(|last| last.borrow_mut().take())
}

/// Runs `body`, turning a panic into `on_panic`.
pub(crate) fn guarded<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    install_panic_hook();
    IN_GUARD.with(|flag| flag.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    IN_GUARD.with(|flag| flag.set(false));
    result.unwrap_or(on_panic)
}

/// Creates an empty store. Returns null if a panic occurred (allocation
/// failure aborts the process, as everywhere in Rust).
///
/// The caller owns the store and frees it with [`rc_store_free`] (in Lua,
/// through `ffi.gc`).
#[no_mangle]
pub extern "C" fn rc_store_new() -> *mut PendingStore {
    guarded(std::ptr::null_mut(), || {
        Box::into_raw(Box::new(PendingStore::new()))
    })
}

/// Frees a store made by [`rc_store_new`]. Null is ignored.
///
/// # Safety
///
/// `store` is null or a pointer from [`rc_store_new`] not yet freed; no
/// pointer obtained from it is used afterwards.
#[no_mangle]
pub unsafe extern "C" fn rc_store_free(store: *mut PendingStore) {
    if !store.is_null() {
        guarded((), || drop(Box::from_raw(store)));
    }
}

/// Hands out a zeroed slot and writes the (possibly moved) base of the slot
/// array to `*slots`.
///
/// # Errors
///
/// Returns the slot index (>= 0), or a negative [`Error`] code:
/// `TooManyKeys`, `BadSlot` for a null pointer, `Internal` on a panic.
///
/// # Safety
///
/// `store` is null or a live store; `slots` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_store_alloc(store: *mut PendingStore, slots: *mut *mut Slot) -> i32 {
    let (store, slots) = match (store.as_mut(), slots.as_mut()) {
        (Some(store), Some(slots)) => (store, slots),
        _ => return Error::BadSlot.code(),
    };
    guarded(Error::Internal.code(), || match store.alloc() {
        Ok(slot) => {
            *slots = store.slots_ptr();
            // Below MAX_PENDING_KEYS (2^22): fits an i32.
            slot as i32
        }
        Err(e) => e.code(),
    })
}

/// Adds to a slot in use: how a delta that failed to apply goes back.
///
/// # Errors
///
/// Returns 0, or a negative [`Error`] code: `BadSlot`, `OutOfExactRange`
/// (int64 overflow; the slot is unchanged), `Internal` on a panic.
///
/// # Safety
///
/// `store` is null or a live store.
#[no_mangle]
pub unsafe extern "C" fn rc_store_add(
    store: *mut PendingStore,
    slot: u32,
    integer: i64,
    fractional: f64,
) -> i32 {
    let store = match store.as_mut() {
        Some(store) => store,
        None => return Error::BadSlot.code(),
    };
    guarded(Error::Internal.code(), || {
        match store.add(slot, integer, fractional) {
            Ok(()) => 0,
            Err(e) => e.code(),
        }
    })
}

/// Drains every pending delta. Writes their number to `*count` and returns
/// them, valid until the next drain of this store or its free.
///
/// # Errors
///
/// On a null argument or a panic, writes 0 and returns null.
///
/// # Safety
///
/// `store` is null or a live store; `count` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_store_drain(store: *mut PendingStore, count: *mut u32) -> *const Delta {
    let (store, count) = match (store.as_mut(), count.as_mut()) {
        (Some(store), Some(count)) => (store, count),
        _ => return std::ptr::null(),
    };
    *count = 0;
    guarded(std::ptr::null(), || {
        let drained = store.drain();
        // Bounded by MAX_PENDING_KEYS.
        *count = drained.len() as u32;
        drained.as_ptr()
    })
}

/// How many keys have a delta pending (0 for null).
///
/// # Safety
///
/// `store` is null or a live store.
#[no_mangle]
pub unsafe extern "C" fn rc_store_pending_keys(store: *const PendingStore) -> u32 {
    match store.as_ref() {
        // Bounded by MAX_PENDING_KEYS.
        Some(store) => store.pending_keys() as u32,
        None => 0,
    }
}

/// The bytes at `ptr`, `len` long; empty for a null pointer.
///
/// # Safety
///
/// `ptr` is null or points to `len` readable bytes that outlive the slice.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

/// Whether `len` bytes at `ptr` are valid UTF-8 (1) or not (0): request
/// counter keys must be, so that the JSON can show them as they are.
///
/// # Safety
///
/// `ptr` is null or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_utf8_valid(ptr: *const u8, len: usize) -> i32 {
    let text = bytes(ptr, len);
    guarded(0, || i32::from(std::str::from_utf8(text).is_ok()))
}

/// Frees a report. Null is ignored.
///
/// # Safety
///
/// `report` is null or from [`crate::ffi_engine::rc_requests_report`], not yet freed.
#[no_mangle]
pub unsafe extern "C" fn rc_report_free(report: *mut Report) {
    if !report.is_null() {
        guarded((), || drop(Box::from_raw(report)));
    }
}

/// Makes a report, before its walk, one for the Prometheus text only:
/// its walk reads no histogram (see
/// [`crate::stats::Report::without_percentiles`]); the JSON is then
/// refused. 0, or `CODE_BAD_ARGUMENT` for a null report.
///
/// # Safety
///
/// `report` is null or live.
#[no_mangle]
pub unsafe extern "C" fn rc_report_without_percentiles(report: *mut Report) -> i32 {
    match report.as_mut() {
        Some(report) => {
            report.without_percentiles();
            0
        }
        None => Error::BadArgument.code(),
    }
}

/// Says in the JSON how many keys are tracked, the cap and the key that
/// counts what is beyond it.
///
/// # Safety
///
/// `report` is null or live; `overflow_key` is null or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_report_key_info(
    report: *mut Report,
    tracked: u32,
    max_keys: u32,
    overflow_key: *const u8,
    len: usize,
) {
    if let Some(report) = report.as_mut() {
        let overflow_key = String::from_utf8_lossy(bytes(overflow_key, len)).into_owned();
        guarded((), || {
            report.set_key_info(KeyInfo {
                tracked: u64::from(tracked),
                max_keys: u64::from(max_keys),
                overflow_key,
                engine: None,
                admission: None,
            })
        });
    }
}

/// Adds the engine's memory (bytes in records, free ones included, and its
/// size) to the key info set by [`rc_report_key_info`]: in the JSON's
/// `key_info`, and as gauges at the end of the Prometheus text.
///
/// # Safety
///
/// `report` is null or live.
#[no_mangle]
pub unsafe extern "C" fn rc_report_engine_memory(report: *mut Report, used_bytes: u64, bytes: u64) {
    if let Some(info) = report.as_mut().and_then(|report| report.key_info_mut()) {
        info.engine = Some(EngineMemory { used_bytes, bytes });
    }
}

/// Begins rendering the report as JSON (`single` non-zero: the first key
/// only, as `single_stats` shows it, whole at once); [`rc_report_render`]
/// goes on. 0, or `CODE_BAD_ARGUMENT` for a null report.
///
/// # Safety
///
/// `report` is null or live.
#[no_mangle]
pub unsafe extern "C" fn rc_report_begin_json(
    report: *mut Report,
    free_space: f64,
    capacity: f64,
    single: i32,
) -> i32 {
    match report.as_mut() {
        // A report without percentiles has none to show.
        Some(report) if report.percentiles() => guarded(Error::Internal.code(), || {
            report.begin_json(free_space, capacity, single != 0);
            0
        }),
        _ => Error::BadArgument.code(),
    }
}

/// Begins rendering the report in the Prometheus text format, labelled
/// with the dict's name; as [`rc_report_begin_json`] otherwise.
///
/// # Safety
///
/// `report` is null or live; `dict` is null or `dict_len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_report_begin_prometheus(
    report: *mut Report,
    dict: *const u8,
    dict_len: usize,
) -> i32 {
    let dict = String::from_utf8_lossy(bytes(dict, dict_len)).into_owned();
    match report.as_mut() {
        Some(report) => guarded(Error::Internal.code(), || {
            report.begin_prometheus(&dict);
            0
        }),
        None => Error::BadArgument.code(),
    }
}

/// Renders up to `max_keys` more keys (0: all) of the text begun: 1 when
/// it is whole, 0 when keys are left, `CODE_INTERNAL` on a caught panic,
/// `CODE_BAD_ARGUMENT` for a null report.
///
/// # Safety
///
/// `report` is null or live.
#[no_mangle]
pub unsafe extern "C" fn rc_report_render(report: *mut Report, max_keys: u32) -> i32 {
    rc_report_render_upto(report, max_keys, 0, std::ptr::null_mut())
}

/// Renders as [`rc_report_render`] does (up to `max_keys` more keys, 0:
/// all), stopping as well after the key that brings the text held (since
/// the last [`rc_report_clear_text`]) to `max_bytes` bytes or more (0: no
/// such limit); the keys rendered in `*rendered` (null: not wanted), a
/// key in each Prometheus section counting once per section. 1 when the
/// text is whole, 0 when keys are left, `CODE_INTERNAL` on a caught panic,
/// `CODE_BAD_ARGUMENT` for a null report.
///
/// # Safety
///
/// `report` is null or live; `rendered` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_report_render_upto(
    report: *mut Report,
    max_keys: u32,
    max_bytes: usize,
    rendered: *mut u32,
) -> i32 {
    let report = match report.as_mut() {
        Some(report) => report,
        None => return Error::BadArgument.code(),
    };
    let max_keys = if max_keys == 0 {
        usize::MAX
    } else {
        max_keys as usize
    };
    let max_bytes = if max_bytes == 0 {
        usize::MAX
    } else {
        max_bytes
    };
    let (done, keys) = match guarded(None, || Some(report.render_upto(max_keys, max_bytes))) {
        Some(result) => result,
        None => return Error::Internal.code(),
    };
    if let Some(rendered) = rendered.as_mut() {
        *rendered = u32::try_from(keys).unwrap_or(u32::MAX);
    }
    i32::from(done)
}

/// The text rendered so far, its length in `*out_len`: valid until the
/// next begin or render, or the report's free. Null for a null argument.
///
/// # Safety
///
/// `report` is null or live; `out_len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_report_text(report: *const Report, out_len: *mut usize) -> *const u8 {
    match (report.as_ref(), out_len.as_mut()) {
        (Some(report), Some(out_len)) => {
            let text = report.text();
            *out_len = text.len();
            text.as_ptr()
        }
        _ => std::ptr::null(),
    }
}

/// Forgets the text rendered so far (see [`rc_report_text`]): the next
/// steps' text follows. Null is ignored.
///
/// # Safety
///
/// `report` is null or live.
#[no_mangle]
pub unsafe extern "C" fn rc_report_clear_text(report: *mut Report) {
    if let Some(report) = report.as_mut() {
        report.clear_text();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    #[test]
    fn null_arguments_are_errors_not_crashes() {
        unsafe {
            let mut slots = ptr::null_mut();
            assert_eq!(
                rc_store_alloc(ptr::null_mut(), &mut slots),
                Error::BadSlot.code()
            );
            assert_eq!(
                rc_store_add(ptr::null_mut(), 0, 1, 0.0),
                Error::BadSlot.code()
            );
            let mut count = 7;
            assert!(rc_store_drain(ptr::null_mut(), &mut count).is_null());
            assert_eq!(rc_store_pending_keys(ptr::null()), 0);
            rc_store_free(ptr::null_mut());
        }
    }

    #[test]
    fn a_store_round_trips_through_the_c_abi() {
        unsafe {
            let store = rc_store_new();
            assert!(!store.is_null());
            let mut slots = ptr::null_mut();
            let slot = rc_store_alloc(store, &mut slots);
            assert_eq!(slot, 0);
            (*slots).integer += 41;
            assert_eq!(rc_store_add(store, 0, 1, 0.5), 0);
            assert_eq!(rc_store_add(store, 9, 1, 0.0), Error::BadSlot.code());
            assert_eq!(rc_store_pending_keys(store), 1);
            let mut count = 0;
            let drained = rc_store_drain(store, &mut count);
            assert_eq!(count, 1);
            assert_eq!((*drained).value, 42.5);
            rc_store_free(store);
        }
    }

    #[test]
    fn reports_render_through_the_c_abi() -> Result<(), Error> {
        unsafe {
            let mut report = Report::new(60, 61.0, 2)?;
            let mut h = crate::histogram::Histogram::new();
            h.record(12.0);
            report.add(
                b"all",
                vec![crate::histogram::Summary::of(&h)],
                Default::default(),
            );
            let report = Box::into_raw(Box::new(report));
            let mut len = 0;
            assert_eq!(rc_report_begin_json(report, 1.0, 2.0, 0), 0);
            assert_eq!(rc_report_render(report, 0), 1);
            let json = rc_report_text(report, &mut len);
            let json = String::from_utf8_lossy(bytes(json, len));
            assert!(json.contains("\"requests\":1"), "{}", json);
            assert_eq!(rc_report_begin_prometheus(report, ptr::null(), 0), 0);
            // One key a step: three sections, then the end.
            assert_eq!(rc_report_render(report, 1), 0);
            assert_eq!(rc_report_render(report, 1), 0);
            assert_eq!(rc_report_render(report, 1), 1);
            let text = rc_report_text(report, &mut len);
            let text = String::from_utf8_lossy(bytes(text, len)).into_owned();
            assert!(
                text.contains("resty_requests_window_rate{dict=\"\",key=\"all\",window=\"60\"} 1")
            );
            // By bytes: one byte of text ends a piece after its first key,
            // whose count is said; 0 keys and 0 bytes: no limit.
            assert_eq!(rc_report_begin_prometheus(report, ptr::null(), 0), 0);
            let mut rendered = 0;
            assert_eq!(rc_report_render_upto(report, 0, 1, &mut rendered), 0);
            assert_eq!(rendered, 1);
            let first = rc_report_text(report, &mut len);
            let first = String::from_utf8_lossy(bytes(first, len)).into_owned();
            // The key's total, then the next section's header.
            assert!(first.contains("key=\"all\"} 0\n# HELP"), "{}", first);
            rc_report_clear_text(report);
            assert_eq!(rc_report_render_upto(report, 0, 0, &mut rendered), 1);
            assert_eq!(rendered, 2);
            let rest = rc_report_text(report, &mut len);
            let rest = String::from_utf8_lossy(bytes(rest, len));
            assert_eq!(first + &rest, text);
            rc_report_free(report);
            assert_eq!(
                rc_report_render(ptr::null_mut(), 0),
                Error::BadArgument.code()
            );
            assert_eq!(
                rc_report_render_upto(ptr::null_mut(), 0, 0, ptr::null_mut()),
                Error::BadArgument.code()
            );
            assert!(rc_report_text(ptr::null(), &mut len).is_null());

            let bad = [0xffu8, 0xfe];
            let key = b"all";
            assert_eq!(rc_utf8_valid(bad.as_ptr(), bad.len()), 0);
            assert_eq!(rc_utf8_valid(key.as_ptr(), key.len()), 1);
            assert_eq!(rc_utf8_valid(ptr::null(), 0), 1);
        }
        Ok(())
    }

    #[test]
    fn a_panic_becomes_an_error_code_and_a_message() {
        let code = guarded(Error::Internal.code(), || panic!("boom"));
        assert_eq!(code, Error::Internal.code());
        let message = take_panic_message().unwrap_or_default();
        assert!(message.contains("boom"), "{:?}", message);
        assert_eq!(take_panic_message(), None);
    }
}
