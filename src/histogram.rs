//! Latency histograms that merge across workers: log-linear buckets (16 per
//! power of two), so that any percentile read from them is within 3.1% of
//! the exact value, plus the exact count, sum and maximum. The request
//! counter keeps them dense in the shared engine
//! ([`crate::engine::requests`]), two bucket counts per word, and reads
//! them back as a sparse [`Histogram`] with [`Histogram::from_buckets`].

/// Sub-buckets per power of two. A value is reported as the middle of its
/// bucket, at most half a bucket (1/32 of the octave's base) away: 3.1%.
/// (32 would halve the error and double the engine's memory per key.)
const SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: i32 = 1 << SUB_BUCKET_BITS;

/// The smallest octave: 2^-3 ms (125 us; $request_time counts whole
/// milliseconds). Anything below, zero included, lands in bucket 0 and
/// reads as 0.
const MIN_EXPONENT: i32 = -3;
/// The largest octave: 2^20 ms (17.5 minutes, so values up to 35 minutes
/// keep their precision). Anything above lands in the last bucket, read as
/// at most the exact maximum, which is kept besides.
///
/// 24 octaves: 385 buckets, 193 words a window in the engine. The range
/// was 2^-10 to 2^30 ms (657 buckets at this resolution): a key of three
/// windows then took 8.1 KB, and greencheek's own test dict of 16k (an
/// engine of 8 KB) could not hold its one key.
const MAX_EXPONENT: i32 = 20;

/// Bucket 0 holds values below 2^MIN_EXPONENT; the others are log-linear.
pub const BUCKETS: u16 = ((MAX_EXPONENT - MIN_EXPONENT + 1) * SUB_BUCKETS + 1) as u16;

/// The largest value recorded as it is (1e12 ms, 31 years); larger ones
/// are recorded as this, so that a sum can never overflow to infinity.
pub const MAX_VALUE: f64 = 1e12;

/// Upper bounds, in milliseconds, of the default Prometheus latency
/// buckets: the client libraries' defaults (0.005 s to 10 s), which
/// dashboards expect.
pub const PROMETHEUS_EDGES_MS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// The same edges in seconds, as users give edges (the `buckets` option)
/// and as the `le` labels show them; each times 1000 is its
/// [`PROMETHEUS_EDGES_MS`] exactly (a test holds it).
pub const DEFAULT_EDGES_S: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The most Prometheus edges a request counter may have: each is a line
/// of text per key at every scrape and a word per key in the engine.
pub const MAX_EDGES: usize = 32;

/// Whether `edges` (seconds) can be a request counter's Prometheus
/// edges: 1 to [`MAX_EDGES`] positive finite numbers, strictly
/// increasing, each at most [`MAX_VALUE`] ms.
pub fn check_edges(edges: &[f64]) -> bool {
    !edges.is_empty()
        && edges.len() <= MAX_EDGES
        && edges.iter().all(|&e| e > 0.0 && e * 1000.0 <= MAX_VALUE)
        && edges.windows(2).all(|w| w[0] < w[1])
}

/// An edge in seconds as the engine compares latencies in milliseconds
/// with it: the same product the Lua side makes of a latency, so that a
/// latency equal to an edge counts at or below it.
pub fn edge_ms(edge_s: f64) -> f64 {
    edge_s * 1000.0
}

/// 2^exponent, for the exponents of the buckets' range: built from its
/// bits (`f64::powi` is a call to a loop where the exponent is not a
/// constant; a report takes a bucket's value for every percentile).
#[inline(always)]
fn pow2(exponent: i32) -> f64 {
    debug_assert!((MIN_EXPONENT..=MAX_EXPONENT + 1).contains(&exponent));
    f64::from_bits(((exponent + 1023) as u64) << 52)
}

/// The bucket of a non-negative, finite value.
pub fn bucket_of(value: f64) -> u16 {
    // NaN compares false with everything: it lands in bucket 0 too.
    if value.is_nan() || value < pow2(MIN_EXPONENT) {
        return 0;
    }
    let bits = value.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    if exponent > MAX_EXPONENT {
        return BUCKETS - 1;
    }
    let sub = ((bits >> (52 - SUB_BUCKET_BITS)) & (SUB_BUCKETS as u64 - 1)) as i32;
    ((exponent - MIN_EXPONENT) * SUB_BUCKETS + sub + 1) as u16
}

/// The value a bucket stands for: the middle of its range (0 for bucket 0).
pub fn bucket_value(bucket: u16) -> f64 {
    if bucket == 0 {
        return 0.0;
    }
    let index = i32::from(bucket) - 1;
    let exponent = index / SUB_BUCKETS + MIN_EXPONENT;
    let sub = index % SUB_BUCKETS;
    pow2(exponent) * (1.0 + (f64::from(sub) + 0.5) / f64::from(SUB_BUCKETS))
}

/// The upper edge of a bucket's range (exclusive).
pub fn bucket_upper(bucket: u16) -> f64 {
    if bucket == 0 {
        return pow2(MIN_EXPONENT);
    }
    let index = i32::from(bucket) - 1;
    let exponent = index / SUB_BUCKETS + MIN_EXPONENT;
    let sub = index % SUB_BUCKETS;
    pow2(exponent) * (1.0 + f64::from(sub + 1) / f64::from(SUB_BUCKETS))
}

/// Requests, their latency sum and maximum, and the latency histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
    /// (bucket, count), sorted by bucket, no zero counts. Sparse: a key's
    /// latencies usually fill a few dozen of the 385 buckets.
    buckets: Vec<(u16, u64)>,
    /// Kept without buckets (an engine too small for them): no
    /// percentiles.
    no_buckets: bool,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Adds one observation. The caller passes a non-negative finite value
    /// (the Lua side checks); anything else is counted as 0, and values
    /// above [`MAX_VALUE`] as that.
    pub fn record(&mut self, value: f64) {
        let value = if value >= 0.0 && value.is_finite() {
            value.min(MAX_VALUE)
        } else {
            0.0
        };
        self.count += 1;
        self.sum += value;
        if value > self.max {
            self.max = value;
        }
        self.add_to_bucket(bucket_of(value), 1);
    }

    fn add_to_bucket(&mut self, bucket: u16, count: u64) {
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => self.buckets[i].1 += count,
            Err(i) => self.buckets.insert(i, (bucket, count)),
        }
    }

    /// A histogram from its parts: `buckets` yields (bucket, count) in
    /// ascending bucket order; zero counts and buckets past the last are
    /// left out.
    pub fn from_buckets(
        count: u64,
        sum: f64,
        max: f64,
        buckets: impl Iterator<Item = (u16, u64)>,
    ) -> Histogram {
        Histogram {
            count,
            sum,
            max,
            buckets: buckets
                .filter(|&(bucket, n)| n > 0 && bucket < BUCKETS)
                .collect(),
            no_buckets: false,
        }
    }

    /// Counts, sum and maximum kept without buckets: [`percentile`] is
    /// then unknown ([`has_buckets`] false).
    ///
    /// [`percentile`]: Histogram::percentile
    /// [`has_buckets`]: Histogram::has_buckets
    pub fn without_buckets(count: u64, sum: f64, max: f64) -> Histogram {
        Histogram {
            count,
            sum,
            max,
            buckets: Vec::new(),
            no_buckets: true,
        }
    }

    /// Whether percentiles can be read (false for
    /// [`without_buckets`](Histogram::without_buckets)).
    pub fn has_buckets(&self) -> bool {
        !self.no_buckets
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The mean, 0 when there are no observations.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// The nearest-rank percentile (`q` in 0..=1): the smallest bucket value
    /// with at least `q` of the observations at or below it, never above
    /// the exact maximum. 0 when empty.
    pub fn percentile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = rank(q, self.count);
        if rank >= self.count {
            return self.max;
        }
        let mut seen = 0u64;
        for &(bucket, count) in &self.buckets {
            // A foreign record's counts may not add up: never overflow.
            seen = seen.saturating_add(count);
            if seen >= rank {
                return bucket_value(bucket).min(self.max);
            }
        }
        self.max
    }
}

/// The percentiles a report shows of each window: p50, p90, p99.
pub const REPORTED_PERCENTILES: [f64; 3] = [0.50, 0.90, 0.99];

/// What a report shows of one window: count, sum, maximum and the
/// [`REPORTED_PERCENTILES`], computed once, while the window is read (a
/// report of 10,000 keys then builds no histogram and walks no bucket list
/// again when it renders).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
    /// None when the window was kept without buckets.
    pub percentiles: Option<[f64; 3]>,
}

/// An empty window, as [`Summary::of`] an empty [`Histogram`]: percentiles
/// 0 (a window the ring no longer holds reads so).
impl Default for Summary {
    fn default() -> Summary {
        Summary {
            count: 0,
            sum: 0.0,
            max: 0.0,
            percentiles: Some([0.0; 3]),
        }
    }
}

impl Summary {
    /// The summary of a histogram: its [`Histogram::percentile`]s.
    pub fn of(histogram: &Histogram) -> Summary {
        Summary {
            count: histogram.count,
            sum: histogram.sum,
            max: histogram.max,
            percentiles: histogram
                .has_buckets()
                .then(|| REPORTED_PERCENTILES.map(|q| histogram.percentile(q))),
        }
    }

    /// The summary of [`Histogram::from_buckets`] with the same arguments,
    /// in one pass that stops once the last percentile is found.
    pub fn from_buckets(
        count: u64,
        sum: f64,
        max: f64,
        buckets: impl Iterator<Item = (u16, u64)>,
    ) -> Summary {
        let mut percentiles = [max; 3];
        // The rank each percentile waits for; those at or past the count
        // are the maximum, as in `Histogram::percentile`.
        let ranks = reported_ranks(count);
        let mut pending = ranks.iter().filter(|&&r| r < count).count();
        let mut seen = 0u64;
        if count > 0 && pending > 0 {
            for (bucket, n) in buckets.filter(|&(bucket, n)| n > 0 && bucket < BUCKETS) {
                let before = seen;
                seen = seen.saturating_add(n);
                for (out, &r) in percentiles.iter_mut().zip(&ranks) {
                    if r < count && before < r && seen >= r {
                        *out = bucket_value(bucket).min(max);
                        pending -= 1;
                    }
                }
                if pending == 0 {
                    break;
                }
            }
        }
        if count == 0 {
            percentiles = [0.0; 3];
        }
        Summary {
            count,
            sum,
            max,
            percentiles: Some(percentiles),
        }
    }

    /// A window kept without buckets: no percentiles.
    pub fn without_buckets(count: u64, sum: f64, max: f64) -> Summary {
        Summary {
            count,
            sum,
            max,
            percentiles: None,
        }
    }

    /// The mean, 0 when there are no observations.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// The highest rank among `count` observations that
/// [`Summary::from_buckets`] looks for in the buckets (the reported
/// percentiles at or past the count are the maximum): 0 when none. A
/// reader of dense buckets whose every non-empty group holds at least one
/// observation finds it within the first that many groups.
pub fn last_rank_read(count: u64) -> u64 {
    reported_ranks(count)
        .iter()
        .copied()
        .filter(|&r| r < count)
        .max()
        .unwrap_or(0)
}

/// The ranks of the [`REPORTED_PERCENTILES`] among `count` observations
/// (ascending, as the percentiles are): [`rank`]'s, in integers below
/// 2^32 (a report reads three a window: the conversions and the
/// multiplications of doubles cost a scrape of busy keys a tenth of its
/// reading). The same: `q x count` of the double nearest to 0.9 (or 0.99)
/// is within a ten-millionth of `9 count / 10` (`99 count / 100`) below
/// 2^32, and rounded to it where that is whole (the double's error, some
/// 2.5e-17 `count`, is below half an ulp of the product); elsewhere that
/// is a tenth (hundredth) from a whole number. A test holds them equal
/// (and they were for every count below 2^32, checked once: 50 s).
#[inline]
pub fn reported_ranks(count: u64) -> [u64; 3] {
    if count == 0 || count >= 1 << 32 {
        return REPORTED_PERCENTILES.map(|q| rank(q, count));
    }
    [
        (count + 1) / 2,
        (9 * count + 9) / 10,
        (99 * count + 99) / 100,
    ]
}

/// The 1-based rank of percentile `q` among `count` observations: the
/// ceiling of `q x count`, at least 1.
#[inline]
fn rank(q: f64, count: u64) -> u64 {
    let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
    // f64::ceil is a call where the target has no rounding instruction
    // (x86-64's baseline): the conversion truncates, one more when short
    // (a conversion past u64::MAX saturates, as `ceil() as u64` does).
    let x = q * count as f64;
    let truncated = x as u64;
    truncated
        .saturating_add(u64::from((truncated as f64) < x))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator, so that a failing trace can be replayed.
    struct Lcg(u64);
    impl Lcg {
        fn next_f64(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn exact_percentile(sorted: &[f64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    #[test]
    fn buckets_are_ordered_and_values_fall_inside_their_bucket() {
        let mut previous = 0;
        let mut value = 0.0005;
        while value < 1e10 {
            let bucket = bucket_of(value);
            assert!(bucket >= previous, "{} went back", value);
            assert!(bucket < BUCKETS);
            if bucket > 0 && bucket < BUCKETS - 1 {
                assert!(value < bucket_upper(bucket), "{}", value);
                assert!(value >= bucket_upper(bucket - 1), "{}", value);
                let error = (bucket_value(bucket) - value).abs() / value;
                assert!(error <= 1.0 / 32.0 + 1e-12, "{} off by {}", value, error);
            }
            previous = bucket;
            value *= 1.013;
        }
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(1e300), BUCKETS - 1);
    }

    #[test]
    fn bucket_values_and_ranks_are_those_of_powi_and_ceil() {
        for bucket in 0..BUCKETS {
            let index = i32::from(bucket) - 1;
            let exponent = index.div_euclid(SUB_BUCKETS) + MIN_EXPONENT;
            let sub = f64::from(index.rem_euclid(SUB_BUCKETS));
            let base = f64::powi(2.0, exponent);
            if bucket > 0 {
                assert_eq!(bucket_value(bucket), base * (1.0 + (sub + 0.5) / 16.0));
                assert_eq!(bucket_upper(bucket), base * (1.0 + (sub + 1.0) / 16.0));
            }
        }
        assert_eq!(bucket_upper(0), 0.125);
        assert_eq!(
            REPORTED_PERCENTILES,
            [0.5, 0.9, 0.99],
            "reported_ranks' integers"
        );
        let mut rng = Lcg(3);
        let counts = (0..100_000u64)
            .chain((0..100_000).map(|_| (rng.next_f64() * 1e19) as u64))
            .chain([u64::MAX, u64::MAX - 1, 1 << 53, (1 << 53) + 1]);
        // Multiples of 10 and 100 (where 9 c / 10 is whole) near the
        // bound of the integer ranks too.
        let near_2_32 = (0..100_000u64).map(|i| (1 << 32) - 50_000 * 100 + i * 100 - (i % 3));
        for count in counts.chain(near_2_32) {
            for q in REPORTED_PERCENTILES
                .iter()
                .chain(&[0.0, 1.0, 0.999, f64::NAN])
            {
                let clamped = if q.is_nan() { 0.0 } else { *q };
                let ceil = ((clamped * count as f64).ceil() as u64).max(1);
                assert_eq!(rank(*q, count), ceil, "{} {}", q, count);
            }
            let ranks = REPORTED_PERCENTILES.map(|q| ((q * count as f64).ceil() as u64).max(1));
            assert_eq!(reported_ranks(count), ranks, "{}", count);
        }
    }

    #[test]
    fn percentiles_are_within_5_percent_of_exact_on_a_mixed_trace() {
        let mut rng = Lcg(7);
        let mut values = Vec::new();
        let mut h = Histogram::new();
        for i in 0..100_000 {
            // Fast requests, a slow tail, and a few very slow ones.
            let v = match i % 100 {
                0..=89 => 1.0 + rng.next_f64() * 20.0,
                90..=98 => 50.0 + rng.next_f64() * 450.0,
                _ => 1000.0 + rng.next_f64() * 29000.0,
            };
            values.push(v);
            h.record(v);
        }
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            let exact = exact_percentile(&values, q);
            let got = h.percentile(q);
            let error = (got - exact).abs() / exact;
            assert!(error < 0.05, "p{}: {} vs exact {}", q, got, exact);
        }
        assert_eq!(h.percentile(1.0), *values.last().unwrap());
        assert_eq!(h.count, 100_000);
    }

    #[test]
    fn default_edges_are_the_milliseconds_ones() {
        assert!(check_edges(&DEFAULT_EDGES_S));
        for (s, ms) in DEFAULT_EDGES_S.iter().zip(PROMETHEUS_EDGES_MS) {
            assert_eq!(edge_ms(*s), ms);
        }
        assert!(!check_edges(&[]));
        assert!(!check_edges(&[0.1, 0.1]));
        assert!(!check_edges(&[0.2, 0.1]));
        assert!(!check_edges(&[0.0]));
        assert!(!check_edges(&[-1.0]));
        assert!(!check_edges(&[f64::NAN]));
        assert!(!check_edges(&[f64::INFINITY]));
        assert!(!check_edges(&[1e10]));
        assert!(check_edges(&[1e9]));
        let many: Vec<f64> = (1..=MAX_EDGES).map(|i| i as f64).collect();
        assert!(check_edges(&many));
        let too_many: Vec<f64> = (1..=MAX_EDGES + 1).map(|i| i as f64).collect();
        assert!(!check_edges(&too_many));
    }

    #[test]
    fn huge_values_stay_finite() {
        let mut h = Histogram::new();
        h.record(1e308);
        h.record(1e308);
        assert_eq!(h.max, MAX_VALUE);
        assert_eq!(h.sum, 2.0 * MAX_VALUE);
    }

    #[test]
    fn empty_and_bad_observations() {
        let mut h = Histogram::new();
        assert_eq!(h.percentile(0.5), 0.0);
        assert_eq!(h.mean(), 0.0);
        h.record(f64::NAN);
        h.record(-3.0);
        assert_eq!(h.count, 2);
        assert_eq!(h.sum, 0.0);
        assert_eq!(h.percentile(0.99), 0.0);
    }

    #[test]
    fn a_summary_read_from_buckets_equals_the_histogram_s() {
        let mut rng = Lcg(11);
        for case in 0..2000 {
            // Dense bucket counts as the engine keeps them: mostly zero, a
            // few filled, sometimes past the last bucket or not adding up
            // to the count (a foreign or torn record).
            let filled = 1 + case % 12;
            let mut dense = vec![0u64; BUCKETS as usize + 3];
            for _ in 0..filled {
                let bucket = (rng.next_f64() * dense.len() as f64) as usize % dense.len();
                dense[bucket] += 1 + (rng.next_f64() * 50.0) as u64;
            }
            let sum_of: u64 = dense.iter().sum();
            let count = match case % 4 {
                0 => sum_of,
                1 => sum_of / 2,
                2 => sum_of + 7,
                _ => (case % 3) as u64,
            };
            let max = rng.next_f64() * 3000.0;
            let pairs = || {
                dense
                    .iter()
                    .enumerate()
                    .map(|(bucket, &n)| (bucket as u16, n))
            };
            let histogram = Histogram::from_buckets(count, 1.5, max, pairs());
            assert_eq!(
                Summary::from_buckets(count, 1.5, max, pairs()),
                Summary::of(&histogram),
                "case {}",
                case
            );
        }
        assert_eq!(Summary::default(), Summary::of(&Histogram::new()));
        let bare = Histogram::without_buckets(3, 9.0, 4.0);
        assert_eq!(Summary::of(&bare), Summary::without_buckets(3, 9.0, 4.0));
        assert_eq!(Summary::of(&bare).mean(), 3.0);
    }
}
