//! Exact `int64` counter values with Redis semantics, for the strict and
//! lax counters (`resty.counter.strict`, `resty.counter.lax`).
//!
//! A value lives in the shared dict as a base-10 string, as Redis keeps an
//! INCR counter: a double would round beyond 2^53. This module parses and
//! formats those strings, and applies one update (add or set, conditional
//! or not) with checked arithmetic: an update that would overflow is an
//! error and changes nothing ("increment or decrement would overflow"), and
//! a stored value that is not a base-10 int64 is an error too ("value is not
//! an integer"). Plain Rust, tested without Lua.

use crate::error::Error;

/// The longest text of an i64: `-9223372036854775808`.
pub const MAX_TEXT_LEN: usize = 20;

/// Parses a stored value: an optional `-` and 1 to 19 ASCII digits, within
/// the i64 range. No sign `+`, no spaces, no fraction, no exponent: what
/// Redis' INCR accepts.
///
/// # Errors
///
/// [`Error::NotInteger`] for anything else, including an out-of-range
/// number.
pub fn parse(text: &[u8]) -> Result<i64, Error> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 {
        return Err(Error::NotInteger);
    }
    // Accumulate negatively: i64::MIN has no positive counterpart.
    let mut value: i64 = 0;
    for &byte in digits {
        if !byte.is_ascii_digit() {
            return Err(Error::NotInteger);
        }
        let digit = i64::from(byte - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_sub(digit))
            .ok_or(Error::NotInteger)?;
    }
    if negative {
        Ok(value)
    } else {
        value.checked_neg().ok_or(Error::NotInteger)
    }
}

/// Writes `value` in base 10 into `out`; returns the length used.
pub fn format(value: i64, out: &mut [u8; MAX_TEXT_LEN]) -> usize {
    let mut digits = [0u8; MAX_TEXT_LEN];
    let mut n = 0;
    // Work on the magnitude as u64: i64::MIN has no positive i64.
    let mut rest = value.unsigned_abs();
    loop {
        digits[n] = b'0' + (rest % 10) as u8;
        n += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut len = 0;
    if value < 0 {
        out[0] = b'-';
        len = 1;
    }
    for i in (0..n).rev() {
        out[len] = digits[i];
        len += 1;
    }
    len
}

/// How a conditional update compares the current value with its operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Always,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    /// The comparator a C code stands for (the order of the Lua names
    /// `always eq ne lt le gt ge`, from 0).
    pub fn from_code(code: i32) -> Option<Cmp> {
        Some(match code {
            0 => Cmp::Always,
            1 => Cmp::Eq,
            2 => Cmp::Ne,
            3 => Cmp::Lt,
            4 => Cmp::Le,
            5 => Cmp::Gt,
            6 => Cmp::Ge,
            _ => return None,
        })
    }

    /// Whether `current <cmp> operand` holds.
    pub fn holds(self, current: i64, operand: i64) -> bool {
        match self {
            Cmp::Always => true,
            Cmp::Eq => current == operand,
            Cmp::Ne => current != operand,
            Cmp::Lt => current < operand,
            Cmp::Le => current <= operand,
            Cmp::Gt => current > operand,
            Cmp::Ge => current >= operand,
        }
    }
}

/// What an update does to the value when its comparison holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `value + n`
    Add,
    /// `value - n` (its own op: `-n` overflows for `n = i64::MIN`)
    Sub,
    /// `n`
    Set,
}

impl Op {
    /// The op a C code stands for: 0 add, 1 sub, 2 set.
    pub fn from_code(code: i32) -> Option<Op> {
        Some(match code {
            0 => Op::Add,
            1 => Op::Sub,
            2 => Op::Set,
            _ => return None,
        })
    }
}

/// The result of [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the comparison held and the value changed to `new`.
    pub applied: bool,
    /// The value after the update (`old` when not applied).
    pub new: i64,
    /// The value before.
    pub old: i64,
}

/// Applies `op n` to `old` when `old <cmp> operand` holds.
///
/// # Errors
///
/// [`Error::Overflow`] when the result leaves the i64 range; nothing is
/// applied then.
pub fn apply(old: i64, op: Op, cmp: Cmp, operand: i64, n: i64) -> Result<Outcome, Error> {
    if !cmp.holds(old, operand) {
        return Ok(Outcome {
            applied: false,
            new: old,
            old,
        });
    }
    let new = match op {
        Op::Add => old.checked_add(n),
        Op::Sub => old.checked_sub(n),
        Op::Set => Some(n),
    }
    .ok_or(Error::Overflow)?;
    Ok(Outcome {
        applied: true,
        new,
        old,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: i64) -> String {
        let mut out = [0u8; MAX_TEXT_LEN];
        let len = format(value, &mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn formats_and_parses_every_edge_exactly() {
        for value in [
            0,
            1,
            -1,
            9,
            10,
            -10,
            (1 << 53) + 1,
            -(1 << 53) - 1,
            i64::MAX,
            i64::MAX - 1,
            i64::MIN,
            i64::MIN + 1,
        ] {
            assert_eq!(text(value), value.to_string());
            assert_eq!(parse(value.to_string().as_bytes()), Ok(value));
        }
    }

    #[test]
    fn refuses_what_redis_incr_refuses() {
        for bad in [
            "",
            "-",
            "+1",
            " 1",
            "1 ",
            "1.5",
            "1e3",
            "0x10",
            "abc",
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "00000000000000000000001",
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(Error::NotInteger), "{:?}", bad);
        }
    }

    #[test]
    fn comparators_follow_their_names() {
        let names = [
            (0, Cmp::Always),
            (1, Cmp::Eq),
            (2, Cmp::Ne),
            (3, Cmp::Lt),
            (4, Cmp::Le),
            (5, Cmp::Gt),
            (6, Cmp::Ge),
        ];
        for (code, cmp) in names {
            assert_eq!(Cmp::from_code(code), Some(cmp));
        }
        assert_eq!(Cmp::from_code(7), None);
        assert_eq!(Cmp::from_code(-1), None);
        let table = [
            (Cmp::Always, [true, true, true]),
            (Cmp::Eq, [false, true, false]),
            (Cmp::Ne, [true, false, true]),
            (Cmp::Lt, [true, false, false]),
            (Cmp::Le, [true, true, false]),
            (Cmp::Gt, [false, false, true]),
            (Cmp::Ge, [false, true, true]),
        ];
        for (cmp, expect) in table {
            for (i, current) in [4, 5, 6].iter().enumerate() {
                assert_eq!(cmp.holds(*current, 5), expect[i], "{:?} {}", cmp, current);
            }
        }
    }

    #[test]
    fn overflow_is_an_error_at_both_ends() {
        let max = i64::MAX;
        let min = i64::MIN;
        assert_eq!(apply(max, Op::Add, Cmp::Always, 0, 1), Err(Error::Overflow));
        assert_eq!(
            apply(min, Op::Add, Cmp::Always, 0, -1),
            Err(Error::Overflow)
        );
        assert_eq!(apply(min, Op::Sub, Cmp::Always, 0, 1), Err(Error::Overflow));
        assert_eq!(apply(0, Op::Sub, Cmp::Always, 0, min), Err(Error::Overflow));
        assert_eq!(apply(-1, Op::Sub, Cmp::Always, 0, min).unwrap().new, max);
        assert_eq!(apply(max - 1, Op::Add, Cmp::Always, 0, 1).unwrap().new, max);
        assert_eq!(apply(min + 1, Op::Sub, Cmp::Always, 0, 1).unwrap().new, min);
        assert_eq!(apply(7, Op::Set, Cmp::Always, 0, min).unwrap().new, min);
    }

    #[test]
    fn a_failed_comparison_changes_nothing_and_cannot_overflow() {
        let out = apply(i64::MAX, Op::Add, Cmp::Lt, 0, 1).unwrap();
        assert_eq!(
            out,
            Outcome {
                applied: false,
                new: i64::MAX,
                old: i64::MAX
            }
        );
        let out = apply(3, Op::Add, Cmp::Lt, 10, 4).unwrap();
        assert_eq!(
            out,
            Outcome {
                applied: true,
                new: 7,
                old: 3
            }
        );
    }
}
