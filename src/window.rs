//! The windows of `resty.counter.limit`: the sliding-window estimate, the
//! time until a window frees, and the accuracy of the estimate measured
//! against an exact sliding log on a generated trace.
//!
//! Windows are aligned on multiples of `window` seconds. The sliding
//! algorithm keeps two counts, the previous window's and the current one's,
//! and estimates the events of the last `window` seconds as
//! `prev * ((window - elapsed) / window) + current`, `elapsed` being the
//! time since the current window began: it assumes the previous window's
//! events were spread evenly. Plain Rust, tested without Lua.

/// The estimated number of events in the last `window` seconds.
/// `elapsed` is clamped to `[0, window]`.
pub fn estimate(prev: f64, current: f64, elapsed: f64, window: f64) -> f64 {
    let elapsed = elapsed.max(0.0).min(window);
    prev * ((window - elapsed) / window) + current
}

/// Whether one more event fits: the estimate with it is at most `limit`.
pub fn allows(prev: f64, current: f64, elapsed: f64, window: f64, limit: f64) -> bool {
    estimate(prev, current + 1.0, elapsed, window) <= limit
}

/// Seconds from now until one more event would be allowed by the sliding
/// estimate, with no other event meanwhile (0 when it is allowed now).
pub fn sliding_wait(prev: f64, current: f64, elapsed: f64, window: f64, limit: f64) -> f64 {
    let elapsed = elapsed.max(0.0).min(window);
    if allows(prev, current, elapsed, window, limit) {
        return 0.0;
    }
    if current + 1.0 <= limit {
        // In this window: prev * (window - e) / window <= limit - current - 1.
        let at = window - (limit - current - 1.0) * window / prev;
        return (at - elapsed).max(0.0);
    }
    // In the next window, where `current` becomes the previous count.
    let until_next = window - elapsed;
    if current <= 0.0 || limit - 1.0 >= current {
        return until_next;
    }
    let at = window - (limit - 1.0) * window / current;
    until_next + at.max(0.0)
}

/// Seconds from now until the current window ends (`RateLimit-Reset` of a
/// fixed window), for a window that began `elapsed` seconds ago.
pub fn fixed_wait(elapsed: f64, window: f64) -> f64 {
    (window - elapsed.max(0.0)).max(0.0)
}

/// The agreement of the sliding estimate with an exact sliding log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// Events in the trace.
    pub events: u64,
    /// Events the exact log allowed.
    pub exact_allowed: u64,
    /// Events the estimate allowed.
    pub estimate_allowed: u64,
    /// Events the estimate allowed and the exact log denied.
    pub false_allows: u64,
    /// Events the estimate denied and the exact log allowed.
    pub false_denies: u64,
    /// The most events the estimate allowed in any `window` seconds (the
    /// exact log never allows more than the limit).
    pub max_in_window: u64,
    /// With the same history (the events the exact log allowed): events
    /// the estimate would allow and the log denies. This is the error of
    /// the estimate itself; the two counts above also include the drift of
    /// two limiters that allowed different events earlier.
    pub same_history_false_allows: u64,
    /// With the same history: events the estimate would deny and the log
    /// allows.
    pub same_history_false_denies: u64,
}

impl Accuracy {
    /// `false_allows` over all events.
    pub fn false_allow_rate(&self) -> f64 {
        self.false_allows as f64 / self.events.max(1) as f64
    }

    /// `false_denies` over all events.
    pub fn false_deny_rate(&self) -> f64 {
        self.false_denies as f64 / self.events.max(1) as f64
    }

    /// `same_history_false_allows` over all events.
    pub fn same_history_false_allow_rate(&self) -> f64 {
        self.same_history_false_allows as f64 / self.events.max(1) as f64
    }

    /// `same_history_false_denies` over all events.
    pub fn same_history_false_deny_rate(&self) -> f64 {
        self.same_history_false_denies as f64 / self.events.max(1) as f64
    }
}

/// An exact sliding log: allows an event when fewer than `limit` allowed
/// events lie in the `window` seconds before it.
struct SlidingLog {
    allowed: std::collections::VecDeque<f64>,
}

impl SlidingLog {
    fn incoming(&mut self, t: f64, window: f64, limit: u64) -> bool {
        while let Some(&first) = self.allowed.front() {
            if first <= t - window {
                self.allowed.pop_front();
            } else {
                break;
            }
        }
        if (self.allowed.len() as u64) < limit {
            self.allowed.push_back(t);
            true
        } else {
            false
        }
    }
}

/// The sliding estimate as `resty.counter.limit` runs it: aligned windows,
/// a rejected event not counted.
struct SlidingEstimate {
    index: i64,
    prev: f64,
    current: f64,
}

impl SlidingEstimate {
    /// Whether one more event at `t` fits, without counting it.
    fn peek(&mut self, t: f64, window: f64, limit: u64) -> bool {
        self.roll(t, window);
        let elapsed = t - self.index as f64 * window;
        allows(self.prev, self.current, elapsed, window, limit as f64)
    }

    fn roll(&mut self, t: f64, window: f64) {
        let index = (t / window).floor() as i64;
        if index != self.index {
            self.prev = if index == self.index + 1 {
                self.current
            } else {
                0.0
            };
            self.current = 0.0;
            self.index = index;
        }
    }

    fn incoming(&mut self, t: f64, window: f64, limit: u64) -> bool {
        let allowed = self.peek(t, window, limit);
        if allowed {
            self.current += 1.0;
        }
        allowed
    }
}

/// Runs both limiters over `trace` (event times in seconds, ascending)
/// and compares their decisions event by event.
pub fn accuracy(trace: &[f64], window: f64, limit: u64) -> Accuracy {
    let mut log = SlidingLog {
        allowed: std::collections::VecDeque::new(),
    };
    let mut est = SlidingEstimate {
        index: i64::MIN / 2,
        prev: 0.0,
        current: 0.0,
    };
    let mut shadow = SlidingEstimate {
        index: i64::MIN / 2,
        prev: 0.0,
        current: 0.0,
    };
    let mut est_allowed_times = std::collections::VecDeque::new();
    let mut acc = Accuracy {
        events: 0,
        exact_allowed: 0,
        estimate_allowed: 0,
        false_allows: 0,
        false_denies: 0,
        max_in_window: 0,
        same_history_false_allows: 0,
        same_history_false_denies: 0,
    };
    for &t in trace {
        acc.events += 1;
        let shadow_allows = shadow.peek(t, window, limit);
        let exact = log.incoming(t, window, limit);
        if exact {
            shadow.current += 1.0;
        }
        if shadow_allows && !exact {
            acc.same_history_false_allows += 1;
        }
        if exact && !shadow_allows {
            acc.same_history_false_denies += 1;
        }
        let estimated = est.incoming(t, window, limit);
        acc.exact_allowed += u64::from(exact);
        acc.estimate_allowed += u64::from(estimated);
        if estimated && !exact {
            acc.false_allows += 1;
        }
        if exact && !estimated {
            acc.false_denies += 1;
        }
        if estimated {
            est_allowed_times.push_back(t);
            while let Some(&first) = est_allowed_times.front() {
                if first <= t - window {
                    est_allowed_times.pop_front();
                } else {
                    break;
                }
            }
            acc.max_in_window = acc.max_in_window.max(est_allowed_times.len() as u64);
        }
    }
    acc
}

/// A small deterministic generator (xorshift64*), so that the trace and
/// the figures in docs/limit.md are the same on every machine.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponential gap with the given mean.
    fn gap(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next_f64()).ln()
    }
}

/// A trace of `seconds` seconds for a limit of `limit` per `window`:
/// steady Poisson traffic at 0.8x the limit, with every 10 windows a phase
/// at 1.5x the limit for 3 windows, and random bursts of 2x the limit packed
/// in a tenth of a window.
pub fn generate_trace(seed: u64, seconds: f64, window: f64, limit: u64) -> Vec<f64> {
    let mut rng = Rng(seed.max(1));
    let rate = limit as f64 / window;
    let mut trace = Vec::new();
    let mut t = 0.0;
    while t < seconds {
        let phase = (t / window) as u64 % 10;
        let factor = if phase >= 7 { 1.5 } else { 0.8 };
        t += rng.gap(1.0 / (rate * factor));
        trace.push(t);
        // A burst starts about once every 4 windows.
        if rng.next_f64() < 1.0 / (4.0 * rate * window) {
            let burst = 2 * limit;
            let span = window / 10.0;
            let mut b = t;
            for _ in 0..burst {
                b += rng.gap(span / burst as f64);
                trace.push(b);
            }
        }
    }
    trace.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_weighs_the_previous_window_by_what_is_left_of_it() {
        assert_eq!(estimate(10.0, 3.0, 0.0, 1.0), 13.0);
        assert_eq!(estimate(10.0, 3.0, 0.5, 1.0), 8.0);
        assert_eq!(estimate(10.0, 3.0, 1.0, 1.0), 3.0);
        assert_eq!(estimate(10.0, 3.0, 2.0, 1.0), 3.0);
        assert_eq!(estimate(10.0, 3.0, -1.0, 1.0), 13.0);
        assert!(allows(10.0, 4.0, 0.5, 1.0, 10.0));
        assert!(!allows(10.0, 5.0, 0.5, 1.0, 10.0));
    }

    #[test]
    fn the_wait_is_when_the_estimate_first_allows_one_more() {
        // Allowed now.
        assert_eq!(sliding_wait(0.0, 0.0, 0.2, 1.0, 5.0), 0.0);
        // prev 10, current 4, limit 10: allowed once 10 * (1 - e) <= 5.
        let w = sliding_wait(10.0, 4.0, 0.2, 1.0, 10.0);
        assert!((w - 0.3).abs() < 1e-9, "{}", w);
        assert!(allows(10.0, 4.0, 0.2 + w, 1.0, 10.0));
        assert!(!allows(10.0, 4.0, 0.2 + w - 0.01, 1.0, 10.0));
        // current at the limit: into the next window, where prev = 10.
        let w = sliding_wait(3.0, 10.0, 0.25, 1.0, 10.0);
        assert!((w - (0.75 + 0.1)).abs() < 1e-9, "{}", w);
        assert!(allows(10.0, 0.0, 0.1, 1.0, 10.0));
        assert!(!allows(10.0, 0.0, 0.09, 1.0, 10.0));
        // A limit of 1 at the limit: the whole next window.
        let w = sliding_wait(0.0, 1.0, 0.5, 1.0, 1.0);
        assert!((w - 1.5).abs() < 1e-9, "{}", w);
        assert_eq!(fixed_wait(0.25, 1.0), 0.75);
        assert_eq!(fixed_wait(2.0, 1.0), 0.0);
    }

    #[test]
    fn the_exact_log_never_allows_more_than_the_limit() {
        let trace = generate_trace(7, 60.0, 1.0, 50);
        let mut log = SlidingLog {
            allowed: std::collections::VecDeque::new(),
        };
        let mut allowed = Vec::new();
        for &t in &trace {
            if log.incoming(t, 1.0, 50) {
                allowed.push(t);
            }
        }
        let mut start = 0;
        for end in 0..allowed.len() {
            while allowed[start] <= allowed[end] - 1.0 {
                start += 1;
            }
            assert!(end - start < 50);
        }
    }

    /// The figures of docs/limit.md's "Accuracy of the sliding window":
    /// `cargo test --no-default-features --lib window -- --nocapture`.
    #[test]
    fn the_sliding_estimate_is_close_to_an_exact_sliding_log() {
        let (window, limit) = (1.0, 100);
        let trace = generate_trace(42, 3600.0, window, limit);
        let acc = accuracy(&trace, window, limit);
        eprintln!(
            "sliding window accuracy, limit {} per {} s, {} events over 3600 s: \
             exact allowed {}, estimate allowed {}, false allows {} ({:.3}%), \
             false denies {} ({:.3}%), most allowed in any window {} ({:.2}x limit); \
             same history: false allows {} ({:.3}%), false denies {} ({:.3}%)",
            limit,
            window,
            acc.events,
            acc.exact_allowed,
            acc.estimate_allowed,
            acc.false_allows,
            100.0 * acc.false_allow_rate(),
            acc.false_denies,
            100.0 * acc.false_deny_rate(),
            acc.max_in_window,
            acc.max_in_window as f64 / limit as f64,
            acc.same_history_false_allows,
            100.0 * acc.same_history_false_allow_rate(),
            acc.same_history_false_denies,
            100.0 * acc.same_history_false_deny_rate()
        );
        assert!(acc.events > 300_000, "{:?}", acc);
        // The bounds docs/limit.md states.
        assert!(acc.false_allow_rate() < 0.08, "{:?}", acc);
        assert!(acc.false_deny_rate() < 0.08, "{:?}", acc);
        assert!(acc.same_history_false_allow_rate() < 0.16, "{:?}", acc);
        assert!(acc.same_history_false_deny_rate() < 0.16, "{:?}", acc);
        assert!(acc.max_in_window as f64 <= 1.5 * limit as f64, "{:?}", acc);
    }

    #[test]
    fn the_trace_is_the_same_for_a_seed() {
        assert_eq!(
            generate_trace(3, 10.0, 1.0, 20),
            generate_trace(3, 10.0, 1.0, 20)
        );
        assert_ne!(
            generate_trace(3, 10.0, 1.0, 20),
            generate_trace(4, 10.0, 1.0, 20)
        );
    }
}
