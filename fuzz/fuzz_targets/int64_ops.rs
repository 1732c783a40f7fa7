//! Strict counters' numbers from outside (dict values anyone can write,
//! decimal strings from `ngx.var`): parsing never panics and agrees with
//! Rust's own parser; formatting round-trips; an update is exact or an
//! overflow, checked against i128; the sliding window's estimate and wait
//! stay finite and non-negative for finite inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::int64::{self, Cmp, Op, MAX_TEXT_LEN};
use resty_counter_core::window;

fn i64_at(data: &[u8], at: usize) -> i64 {
    let mut raw = [0u8; 8];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = *data.get(at + i).unwrap_or(&0);
    }
    i64::from_le_bytes(raw)
}

fuzz_target!(|data: &[u8]| {
    // Parsing arbitrary bytes.
    if let Ok(v) = int64::parse(data) {
        let text = std::str::from_utf8(data).expect("parsed bytes are text");
        assert_eq!(text.parse::<i64>().ok(), Some(v), "{:?}", text);
        let mut out = [0u8; MAX_TEXT_LEN];
        let len = int64::format(v, &mut out);
        assert_eq!(int64::parse(&out[..len]), Ok(v));
    }

    if data.len() < 26 {
        return;
    }
    let (old, operand, n) = (i64_at(data, 0), i64_at(data, 8), i64_at(data, 16));
    let op = Op::from_code(i32::from(data[24] % 3)).unwrap();
    let cmp = Cmp::from_code(i32::from(data[25] % 7)).unwrap();
    let holds = cmp.holds(old, operand);
    let exact = match op {
        Op::Add => i128::from(old) + i128::from(n),
        Op::Sub => i128::from(old) - i128::from(n),
        Op::Set => i128::from(n),
    };
    match int64::apply(old, op, cmp, operand, n) {
        Ok(outcome) => {
            assert_eq!(outcome.applied, holds);
            assert_eq!(outcome.old, old);
            let expected = if holds { exact } else { i128::from(old) };
            assert_eq!(i128::from(outcome.new), expected);
        }
        Err(_) => {
            assert!(holds, "a failed comparison is not an error");
            assert!(exact > i128::from(i64::MAX) || exact < i128::from(i64::MIN));
        }
    }

    // The sliding window with finite, non-negative inputs.
    let f = |at: usize| (i64_at(data, at) as f64).abs() / 1e6;
    let (prev, current, elapsed, span, limit) = (f(0), f(8), f(16), f(3) + 1e-3, f(5));
    let elapsed = elapsed % span;
    let estimate = window::estimate(prev, current, elapsed, span);
    assert!(estimate.is_finite() && estimate >= 0.0, "{}", estimate);
    let wait = window::sliding_wait(prev, current, elapsed, span, limit);
    assert!(wait.is_finite() && wait >= 0.0, "{}", wait);
    let _ = window::allows(prev, current, elapsed, span, limit);
});
