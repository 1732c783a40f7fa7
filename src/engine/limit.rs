//! The limits' records in the engine (`resty.counter.limit` on one node):
//! one record per (limiter, key) whose 16-byte pair holds the counts of
//! the current window and of the one before, and the current window's
//! index, changed by one double-width compare-and-swap (docs/engine.md,
//! "Limit records").
//!
//! The pair is `[value, meta]`:
//!
//! - value: the current window's count in the low 32 bits, the previous
//!   window's in the high 32 bits;
//! - meta: `(index << 1) | 1`, the index of the window `value`'s current
//!   count belongs to (0: a record nobody has written).
//!
//! An event is one compare-and-swap that rolls the window when needed
//! (current to previous when the record holds the window before, both to 0
//! when it is older) and adds 1, decided from the counts it would write:
//! a rejected event writes nothing, so nothing is ever undone and at most
//! `limit` events are allowed per window, whatever the workers. Generic
//! over the pair (hardware or loom's model of it), no mlua.

use super::strict::Pair;
use crate::window;

/// The first byte of every limit key in the table.
pub const KIND: u8 = b'w';

/// Cells per limit record: three words hold one 16-byte aligned pair
/// wherever the record starts (as a strict record's).
pub const WIDTH: u32 = 3;

/// The largest limit a record counts to (its counts are 32-bit halves).
pub const MAX_LIMIT: u64 = u32::MAX as u64;

/// The largest window index a record holds (`meta` keeps it above a flag).
pub const MAX_INDEX: u64 = u64::MAX >> 1;

/// A limiter's rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// Events allowed per window (1 to [`MAX_LIMIT`]).
    pub limit: u64,
    /// The window, in seconds (for the sliding estimate).
    pub window: f64,
    /// Sliding (the estimate of src/window.rs) or fixed.
    pub sliding: bool,
}

/// The counts of one record as seen in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// The window they are for.
    pub index: u64,
    /// The previous window's count.
    pub prev: u64,
    /// The current window's count.
    pub current: u64,
}

/// What `incoming` decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Allowed (and, when committed, counted).
    pub allowed: bool,
    /// The window's use with this event: the count (fixed) or the
    /// estimate (sliding) it would have or has after it.
    pub used: f64,
}

/// The pair that holds `counts`.
pub fn pack(counts: Counts) -> [u64; 2] {
    [
        (counts.prev << 32) | counts.current,
        (counts.index << 1) | 1,
    ]
}

/// The counts of `pair` as of window `index`: rolled when the record holds
/// an older window. A record ahead of `index` (a worker whose clock lags
/// by a window) is taken as it is: the event counts in the newer window.
pub fn counts_at(pair: [u64; 2], index: u64) -> Counts {
    let [value, meta] = pair;
    let (held, current, prev) = (meta >> 1, value & 0xffff_ffff, value >> 32);
    if meta == 0 {
        return Counts {
            index,
            prev: 0,
            current: 0,
        };
    }
    if held >= index {
        Counts {
            index: held,
            prev,
            current,
        }
    } else if held + 1 == index {
        Counts {
            index,
            prev: current,
            current: 0,
        }
    } else {
        Counts {
            index,
            prev: 0,
            current: 0,
        }
    }
}

/// Whether an event of window `index` goes into the record's previous
/// count: a fixed window's event from a worker whose clock lags the
/// record's window by one (its window's count is still there, exact). A
/// sliding window's such event (its estimate would need a count the record
/// no longer has) and one that lags more count in the record's window.
fn into_prev(rule: &Rule, pair: [u64; 2], index: u64) -> bool {
    !rule.sliding && pair[1] != 0 && pair[1] >> 1 == index.wrapping_add(1)
}

/// The counts with one more event of window `index`, `elapsed` seconds
/// into it, and the window's use with it.
fn with_one_more(rule: &Rule, pair: [u64; 2], index: u64, elapsed: f64) -> (Counts, f64) {
    let mut counts = counts_at(pair, index);
    if into_prev(rule, pair, index) {
        counts.prev += 1;
        return (counts, counts.prev as f64);
    }
    counts.current += 1;
    if !rule.sliding {
        return (counts, counts.current as f64);
    }
    // Ahead of the caller's window: none of the record's has elapsed.
    let elapsed = if counts.index > index { 0.0 } else { elapsed };
    let used = window::estimate(
        counts.prev as f64,
        counts.current as f64,
        elapsed,
        rule.window,
    );
    (counts, used)
}

/// One event for the record in window `index`, `elapsed` seconds into it:
/// allowed when the window's use with it is at most the limit, and then
/// counted when `commit` (one compare-and-swap; a dry run or a rejection
/// writes nothing). `index` is at most [`MAX_INDEX`], `rule.limit` at most
/// [`MAX_LIMIT`] (so a count never passes 32 bits).
pub fn incoming<P: Pair>(
    pair: &P,
    rule: &Rule,
    index: u64,
    elapsed: f64,
    commit: bool,
) -> Decision {
    let mut seen = pair.load_fast();
    let mut whole = false;
    loop {
        let (counts, used) = with_one_more(rule, seen, index, elapsed);
        let allowed = used <= rule.limit as f64;
        if !(allowed && commit) {
            // Nothing to write: decided on a whole read.
            if whole {
                return Decision { allowed, used };
            }
            seen = pair.load();
            whole = true;
            continue;
        }
        match pair.compare_exchange(seen, pack(counts)) {
            Ok(()) => return Decision { allowed, used },
            Err(there) => {
                seen = there;
                whole = true;
            }
        }
    }
}

/// Gives back one event that `incoming` counted in window `index` (from
/// where it counted it): false when that count is 0, nothing to give back
/// (also when the record has moved on past it).
pub fn uncommit<P: Pair>(pair: &P, rule: &Rule, index: u64) -> bool {
    let mut seen = pair.load();
    loop {
        let mut counts = counts_at(seen, index);
        let count = if into_prev(rule, seen, index) {
            &mut counts.prev
        } else if counts.index == index {
            &mut counts.current
        } else {
            return false;
        };
        if *count == 0 {
            return false;
        }
        *count -= 1;
        match pair.compare_exchange(seen, pack(counts)) {
            Ok(()) => return true,
            Err(there) => seen = there,
        }
    }
}

/// Whether a record holds nothing a decision in window `index` or later
/// needs: it was written, in a window older than `index - 1` (a fixed
/// window reads only the current window's count, a sliding one the
/// current and the previous). Such a record may be removed (by
/// `remove_if`, asking again under the table lock: an event landing
/// meanwhile made it current and keeps it). A record nobody wrote yet (a
/// worker made it and is about to count) is never stale.
pub fn stale_at(pair: [u64; 2], index: u64) -> bool {
    let meta = pair[1];
    meta != 0 && (meta >> 1).saturating_add(1) < index
}

/// [`stale_at`] of the record's pair, read atomically.
pub fn stale<P: Pair>(pair: &P, index: u64) -> bool {
    stale_at(pair.load(), index)
}

/// The record's counts as of window `index`, read atomically.
pub fn counts<P: Pair>(pair: &P, index: u64) -> Counts {
    counts_at(pair.load(), index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::strict::tests::{cells, pair};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    const _: () = assert!(WIDTH == crate::engine::strict::WIDTH);

    const FIXED3: Rule = Rule {
        limit: 3,
        window: 10.0,
        sliding: false,
    };

    #[test]
    fn a_fixed_window_allows_the_limit_and_writes_no_rejection() {
        let c = cells();
        let p = pair(&c);
        for n in 1..=3 {
            let d = incoming(p, &FIXED3, 100, 1.0, true);
            assert!(d.allowed);
            assert_eq!(d.used, n as f64);
        }
        let before = p.load();
        let d = incoming(p, &FIXED3, 100, 1.0, true);
        assert!(!d.allowed);
        assert_eq!(d.used, 4.0);
        assert_eq!(p.load(), before, "a rejection writes nothing");
        // A dry run neither.
        assert!(!incoming(p, &FIXED3, 100, 1.0, false).allowed);
        assert_eq!(p.load(), before);
        // The next window: the count rolls into prev.
        assert!(incoming(p, &FIXED3, 101, 0.0, true).allowed);
        assert_eq!(
            counts(p, 101),
            Counts {
                index: 101,
                prev: 3,
                current: 1
            }
        );
        // Two windows on: both counts are gone.
        assert_eq!(
            counts(p, 103),
            Counts {
                index: 103,
                prev: 0,
                current: 0
            }
        );
        // A lagging worker's event counts in its own window, the
        // record's previous one, against the limit.
        assert!(!incoming(p, &FIXED3, 100, 9.0, true).allowed);
        assert!(uncommit(p, &FIXED3, 100));
        assert!(incoming(p, &FIXED3, 100, 9.0, true).allowed);
        assert_eq!(counts(p, 100).index, 101);
        assert_eq!((counts(p, 101).prev, counts(p, 101).current), (3, 1));
    }

    #[test]
    fn only_records_of_windows_before_the_previous_are_stale() {
        let c = cells();
        let p = pair(&c);
        assert!(!stale(p, 1000), "a record nobody wrote");
        incoming(p, &FIXED3, 100, 0.0, true);
        assert!(!stale(p, 100), "the current window");
        assert!(!stale(p, 101), "the previous window: sliding reads it");
        assert!(stale(p, 102));
        assert!(stale(p, MAX_INDEX));
        // A lagging worker's view: the record is ahead of it.
        assert!(!stale(p, 99));
        assert!(!stale(p, 0));
        // An event of the new window makes it current again.
        incoming(p, &FIXED3, 102, 0.0, true);
        assert!(!stale(p, 102) && !stale(p, 103) && stale(p, 104));
    }

    #[test]
    fn the_sliding_window_weighs_the_previous_count() {
        let rule = Rule {
            limit: 10,
            window: 1.0,
            sliding: true,
        };
        let c = cells();
        let p = pair(&c);
        for _ in 0..10 {
            assert!(incoming(p, &rule, 5, 0.5, true).allowed);
        }
        assert!(!incoming(p, &rule, 5, 0.9, true).allowed);
        // Half into the next window: 10 * 0.5 + current; 5 more fit.
        for n in 1..=5 {
            let d = incoming(p, &rule, 6, 0.5, true);
            assert!(d.allowed, "{}", n);
            assert_eq!(d.used, 5.0 + n as f64);
        }
        assert!(!incoming(p, &rule, 6, 0.5, true).allowed);
        assert!(incoming(p, &rule, 6, 0.65, true).allowed);
    }

    #[test]
    fn uncommit_gives_back_only_what_the_window_counted() {
        let c = cells();
        let p = pair(&c);
        assert!(!uncommit(p, &FIXED3, 7), "an empty record");
        incoming(p, &FIXED3, 7, 0.0, true);
        assert!(uncommit(p, &FIXED3, 7));
        assert!(!uncommit(p, &FIXED3, 7));
        incoming(p, &FIXED3, 7, 0.0, true);
        assert!(!uncommit(p, &FIXED3, 8), "the next window counted nothing");
        assert_eq!(counts(p, 7).current, 1);
    }

    #[test]
    fn the_largest_limit_fits_the_halves() {
        let rule = Rule {
            limit: MAX_LIMIT,
            window: 1.0,
            sliding: true,
        };
        let c = cells();
        let p = pair(&c);
        p.compare_exchange(
            [0, 0],
            pack(Counts {
                index: 1,
                prev: MAX_LIMIT,
                current: MAX_LIMIT - 1,
            }),
        )
        .unwrap();
        assert!(incoming(p, &rule, 1, 1.0, true).allowed);
        assert!(!incoming(p, &rule, 1, 1.0, true).allowed);
        assert_eq!(counts(p, 1).prev, MAX_LIMIT, "no carry into prev");
        assert!(incoming(p, &rule, 2, 1.0, true).allowed);
        assert_eq!(counts(p, 2).prev, MAX_LIMIT);
    }

    /// Threads racing at the cap, then all rolling into the next window
    /// at once: exactly `limit` allowed in each.
    #[test]
    fn racing_threads_never_pass_the_limit() {
        let region: Arc<Vec<AtomicU64>> = Arc::new(cells());
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let rule = Rule {
            limit: 1000,
            window: 1.0,
            sliding: false,
        };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (region, barrier) = (region.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let p = pair(&region);
                    let mut allowed = [0u64; 2];
                    for (index, sum) in allowed.iter_mut().enumerate() {
                        barrier.wait();
                        for _ in 0..1000 {
                            if incoming(p, &rule, index as u64, 0.5, true).allowed {
                                *sum += 1;
                            }
                        }
                    }
                    allowed
                })
            })
            .collect();
        let mut total = [0u64; 2];
        for t in threads {
            for (sum, one) in total.iter_mut().zip(t.join().unwrap()) {
                *sum += one;
            }
        }
        assert_eq!(total, [1000, 1000]);
        assert_eq!(
            counts(pair(&region), 1),
            Counts {
                index: 1,
                prev: 1000,
                current: 1000
            }
        );
    }
}
