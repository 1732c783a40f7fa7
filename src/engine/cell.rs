//! What a cell holds, for the kinds that count: an exact `i64` sum, or an
//! `f64` sum kept as its bits. Every update is one compare-and-swap loop on
//! one word (a single `lock cmpxchg` when nobody else writes the word), so
//! it is atomic across workers and never torn.

use std::sync::atomic::Ordering::Relaxed;

use super::word::Word;
use super::Error;

/// The cell's value as an `i64`.
#[inline]
pub fn load_i64<W: Word>(cell: &W) -> i64 {
    cell.load(Relaxed) as i64
}

/// Adds `step` to an `i64` cell and returns the new value.
///
/// # Errors
///
/// `Overflow` when the sum would leave the `i64` range; the cell is left
/// as it was.
#[inline]
pub fn add_i64<W: Word>(cell: &W, step: i64) -> Result<i64, Error> {
    let mut current = cell.load(Relaxed);
    loop {
        let sum = (current as i64).checked_add(step).ok_or(Error::Overflow)?;
        match cell.compare_exchange(current, sum as u64, Relaxed, Relaxed) {
            Ok(_) => return Ok(sum),
            Err(now) => current = now,
        }
    }
}

/// The cell's value as an `f64`.
#[inline]
pub fn load_f64<W: Word>(cell: &W) -> f64 {
    f64::from_bits(cell.load(Relaxed))
}

/// Adds `step` to an `f64` cell and returns the new value. (A zeroed cell
/// reads as 0.0.)
#[inline]
pub fn add_f64<W: Word>(cell: &W, step: f64) -> f64 {
    let mut current = cell.load(Relaxed);
    loop {
        let sum = f64::from_bits(current) + step;
        match cell.compare_exchange(current, sum.to_bits(), Relaxed, Relaxed) {
            Ok(_) => return sum,
            Err(now) => current = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn i64_sums_are_exact_and_refuse_overflow() {
        let cell = AtomicU64::new(0);
        assert_eq!(add_i64(&cell, 5).unwrap(), 5);
        assert_eq!(add_i64(&cell, -7).unwrap(), -2);
        assert_eq!(add_i64(&cell, i64::MAX).unwrap(), i64::MAX - 2);
        assert_eq!(add_i64(&cell, 3).unwrap_err(), Error::Overflow);
        assert_eq!(load_i64(&cell), i64::MAX - 2);
        assert_eq!(add_i64(&cell, 2).unwrap(), i64::MAX);
    }

    #[test]
    fn f64_sums_start_at_zero() {
        let cell = AtomicU64::new(0);
        assert_eq!(load_f64(&cell), 0.0);
        assert_eq!(add_f64(&cell, 0.25), 0.25);
        assert_eq!(add_f64(&cell, 0.5), 0.75);
    }

    #[test]
    fn threads_lose_no_step() {
        let cell = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cell = Arc::clone(&cell);
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        add_i64(&*cell, 1).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(load_i64(&*cell), 400_000);
    }
}
