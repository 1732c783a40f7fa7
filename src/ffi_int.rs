//! The C ABI of the strict and lax counters and the rate limiter: exact
//! int64 updates ([`crate::int64`]) and the sliding window
//! ([`crate::window`]), called by LuaJIT through `ffi.cdef` (declarations in
//! `lua/resty/counter/abi.lua`, checked by `tests/lua_abi.rs`; change both
//! together and bump [`ABI_VERSION`]).
//!
//! Like [`crate::ffi`], every function checks its pointers, catches any
//! panic and reports failures as negative [`Error`] codes.

use crate::error::Error;
use crate::ffi::guarded;
use crate::int64::{self, Cmp, Op, MAX_TEXT_LEN};
use crate::window;

/// The version of the declarations below, checked by the Lua side.
pub const ABI_VERSION: i32 = 1;

/// The result of [`rc_int_apply`]: the values before and after, and the
/// new value as the base-10 text to store.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IntResult {
    pub new_value: i64,
    pub old_value: i64,
    pub len: i32,
    pub text: [u8; MAX_TEXT_LEN],
}

/// Applies one update to a stored value: `op n` (0 add, 1 sub, 2 set) when
/// `current <cmp> operand` (0 always, 1 eq, 2 ne, 3 lt, 4 le, 5 gt, 6 ge).
/// `current` is the stored text, or null for a missing key (0).
///
/// # Errors
///
/// Returns 1 when applied, 0 when the comparison failed (`new_value ==
/// old_value`), or a negative [`Error`] code: `NotInteger` (the stored text
/// is not a base-10 int64), `Overflow` (nothing applied), `BadArgument` (an
/// unknown code or a null `out`), `Internal` on a panic.
///
/// # Safety
///
/// `current` is null or points to `len` readable bytes; `out` is null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn rc_int_apply(
    current: *const u8,
    len: usize,
    op: i32,
    cmp: i32,
    operand: i64,
    n: i64,
    out: *mut IntResult,
) -> i32 {
    let out = match out.as_mut() {
        Some(out) => out,
        None => return Error::BadArgument.code(),
    };
    let (op, cmp) = match (Op::from_code(op), Cmp::from_code(cmp)) {
        (Some(op), Some(cmp)) => (op, cmp),
        _ => return Error::BadArgument.code(),
    };
    guarded(Error::Internal.code(), || {
        let old = if current.is_null() {
            0
        } else {
            match int64::parse(std::slice::from_raw_parts(current, len)) {
                Ok(old) => old,
                Err(e) => return e.code(),
            }
        };
        write_outcome(old, op, cmp, operand, n, out)
    })
}

/// [`rc_int_apply`] for a value stored as a number (a double the caller has
/// checked to be an integer within +-(2^53 - 1)), passed as an i64.
///
/// # Errors
///
/// As [`rc_int_apply`], but never `NotInteger`.
///
/// # Safety
///
/// `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn rc_int_apply_i64(
    current: i64,
    op: i32,
    cmp: i32,
    operand: i64,
    n: i64,
    out: *mut IntResult,
) -> i32 {
    let out = match out.as_mut() {
        Some(out) => out,
        None => return Error::BadArgument.code(),
    };
    let (op, cmp) = match (Op::from_code(op), Cmp::from_code(cmp)) {
        (Some(op), Some(cmp)) => (op, cmp),
        _ => return Error::BadArgument.code(),
    };
    guarded(Error::Internal.code(), || {
        write_outcome(current, op, cmp, operand, n, out)
    })
}

fn write_outcome(old: i64, op: Op, cmp: Cmp, operand: i64, n: i64, out: &mut IntResult) -> i32 {
    match int64::apply(old, op, cmp, operand, n) {
        Ok(outcome) => {
            out.new_value = outcome.new;
            out.old_value = outcome.old;
            // At most MAX_TEXT_LEN (20).
            out.len = int64::format(outcome.new, &mut out.text) as i32;
            i32::from(outcome.applied)
        }
        Err(e) => e.code(),
    }
}

/// Parses a stored value (or a decimal argument) into `*out`.
///
/// # Errors
///
/// Returns 0, or a negative [`Error`] code: `NotInteger`, `BadArgument`
/// for a null pointer, `Internal` on a panic.
///
/// # Safety
///
/// `text` is null or points to `len` readable bytes; `out` is null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn rc_int_parse(text: *const u8, len: usize, out: *mut i64) -> i32 {
    let out = match out.as_mut() {
        Some(out) => out,
        None => return Error::BadArgument.code(),
    };
    if text.is_null() {
        return Error::BadArgument.code();
    }
    guarded(Error::Internal.code(), || {
        match int64::parse(std::slice::from_raw_parts(text, len)) {
            Ok(value) => {
                *out = value;
                0
            }
            Err(e) => e.code(),
        }
    })
}

/// Writes `value` in base 10 to `out` (20 bytes at least); returns the
/// length, or `BadArgument` for a null pointer.
///
/// # Safety
///
/// `out` is null or points to 20 writable bytes.
#[no_mangle]
pub unsafe extern "C" fn rc_int_format(value: i64, out: *mut [u8; MAX_TEXT_LEN]) -> i32 {
    match out.as_mut() {
        // At most MAX_TEXT_LEN (20).
        Some(out) => guarded(Error::Internal.code(), || int64::format(value, out) as i32),
        None => Error::BadArgument.code(),
    }
}

/// [`window::estimate`]: the sliding-window estimate of the events in the
/// last `window` seconds. Cannot fail.
#[no_mangle]
pub extern "C" fn rc_sliding_estimate(prev: f64, current: f64, elapsed: f64, window: f64) -> f64 {
    window::estimate(prev, current, elapsed, window)
}

/// [`window::sliding_wait`]: seconds until one more event fits (0 now).
/// Returns -1 on a panic (a bug).
#[no_mangle]
pub extern "C" fn rc_sliding_wait(
    prev: f64,
    current: f64,
    elapsed: f64,
    window: f64,
    limit: f64,
) -> f64 {
    guarded(-1.0, || {
        window::sliding_wait(prev, current, elapsed, window, limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn result() -> IntResult {
        IntResult {
            new_value: 0,
            old_value: 0,
            len: 0,
            text: [0; MAX_TEXT_LEN],
        }
    }

    #[test]
    fn an_update_round_trips_through_the_c_abi() {
        let mut out = result();
        let stored = b"41";
        let rc = unsafe { rc_int_apply(stored.as_ptr(), 2, 0, 0, 0, 1, &mut out) };
        assert_eq!(rc, 1);
        assert_eq!((out.old_value, out.new_value), (41, 42));
        assert_eq!(&out.text[..out.len as usize], b"42");
        // A missing key is 0; lt 0 fails.
        let rc = unsafe { rc_int_apply(ptr::null(), 0, 0, 3, 0, 5, &mut out) };
        assert_eq!(rc, 0);
        assert_eq!((out.old_value, out.new_value), (0, 0));
        let max = i64::MAX.to_string();
        let rc = unsafe { rc_int_apply(max.as_ptr(), max.len(), 0, 0, 0, 1, &mut out) };
        assert_eq!(rc, Error::Overflow.code());
        let rc = unsafe { rc_int_apply(b"1.5".as_ptr(), 3, 2, 0, 0, 1, &mut out) };
        assert_eq!(rc, Error::NotInteger.code());
        let rc = unsafe { rc_int_apply_i64(41, 0, 3, 100, 1, &mut out) };
        assert_eq!((rc, out.old_value, out.new_value), (1, 41, 42));
        let rc = unsafe { rc_int_apply_i64(i64::MAX, 0, 0, 0, 1, &mut out) };
        assert_eq!(rc, Error::Overflow.code());
        let rc = unsafe { rc_int_apply_i64(0, 5, 0, 0, 1, &mut out) };
        assert_eq!(rc, Error::BadArgument.code());
    }

    #[test]
    fn bad_codes_and_null_pointers_are_errors_not_crashes() {
        let mut out = result();
        unsafe {
            assert_eq!(
                rc_int_apply(ptr::null(), 0, 3, 0, 0, 1, &mut out),
                Error::BadArgument.code()
            );
            assert_eq!(
                rc_int_apply(ptr::null(), 0, 0, 9, 0, 1, &mut out),
                Error::BadArgument.code()
            );
            assert_eq!(
                rc_int_apply(ptr::null(), 0, 0, 0, 0, 1, ptr::null_mut()),
                Error::BadArgument.code()
            );
            let mut v = 0;
            assert_eq!(
                rc_int_parse(ptr::null(), 0, &mut v),
                Error::BadArgument.code()
            );
            assert_eq!(rc_int_parse(b"-7".as_ptr(), 2, &mut v), 0);
            assert_eq!(v, -7);
            assert_eq!(rc_int_format(1, ptr::null_mut()), Error::BadArgument.code());
            let mut text = [0u8; MAX_TEXT_LEN];
            assert_eq!(rc_int_format(i64::MIN, &mut text), 20);
        }
    }

    #[test]
    fn the_window_functions_match_the_core() {
        assert_eq!(rc_sliding_estimate(10.0, 3.0, 0.5, 1.0), 8.0);
        assert_eq!(rc_sliding_wait(0.0, 0.0, 0.0, 1.0, 1.0), 0.0);
    }
}
