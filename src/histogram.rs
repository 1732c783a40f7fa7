//! Latency histograms that merge across workers: log-linear buckets (32 per
//! power of two), so that any percentile read from them is within 1.6% of
//! the exact value, plus the exact count, sum and maximum.
//!
//! A histogram travels between workers as a compact byte string (see
//! [`Histogram::encode`]) stored in the shared dict; merging two is adding
//! their bucket counts, so the order of merges never matters.

use std::fmt;

/// Sub-buckets per power of two. A value is reported as the middle of its
/// bucket, at most half a bucket (1/64 of the octave's base) away: 1.6%.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: i32 = 1 << SUB_BUCKET_BITS;

/// The smallest octave: 2^-10 ms (about 1 us). Anything below, zero
/// included, lands in bucket 0 and reads as 0.
const MIN_EXPONENT: i32 = -10;
/// The largest octave: 2^30 ms (12 days). Anything above lands in the last
/// bucket; the exact maximum is kept besides.
const MAX_EXPONENT: i32 = 30;

/// Bucket 0 holds values below 2^MIN_EXPONENT; the others are log-linear.
pub const BUCKETS: u16 = ((MAX_EXPONENT - MIN_EXPONENT + 1) * SUB_BUCKETS + 1) as u16;

/// The largest value recorded as it is (1e12 ms, 31 years); larger ones
/// are recorded as this, so that a sum can never overflow to infinity.
pub const MAX_VALUE: f64 = 1e12;

/// Encoding version, the first byte of every encoded histogram.
const FORMAT_VERSION: u8 = 1;

/// The bucket of a non-negative, finite value.
pub fn bucket_of(value: f64) -> u16 {
    // NaN compares false with everything: it lands in bucket 0 too.
    if value.is_nan() || value < f64::powi(2.0, MIN_EXPONENT) {
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
    let base = f64::powi(2.0, exponent);
    base * (1.0 + (f64::from(sub) + 0.5) / f64::from(SUB_BUCKETS))
}

/// The upper edge of a bucket's range (exclusive).
pub fn bucket_upper(bucket: u16) -> f64 {
    if bucket == 0 {
        return f64::powi(2.0, MIN_EXPONENT);
    }
    let index = i32::from(bucket) - 1;
    let exponent = index / SUB_BUCKETS + MIN_EXPONENT;
    let sub = index % SUB_BUCKETS;
    f64::powi(2.0, exponent) * (1.0 + f64::from(sub + 1) / f64::from(SUB_BUCKETS))
}

/// Why an encoded histogram could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptRecord;

impl fmt::Display for CorruptRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("corrupt record")
    }
}

/// Requests, their latency sum and maximum, and the latency histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
    /// (bucket, count), sorted by bucket, no zero counts. Sparse: a key's
    /// latencies usually fill a few dozen of the 1313 buckets.
    buckets: Vec<(u16, u64)>,
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

    /// Adds another histogram into this one.
    pub fn merge(&mut self, other: &Histogram) {
        self.count = self.count.saturating_add(other.count);
        // Finite stays finite, whatever a foreign record held.
        self.sum = (self.sum + other.sum).min(f64::MAX);
        if other.max > self.max {
            self.max = other.max;
        }
        for &(bucket, count) in &other.buckets {
            match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
                Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(count),
                Err(i) => self.buckets.insert(i, (bucket, count)),
            }
        }
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
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
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

    /// How many observations are at or below `edge`, counting a bucket as
    /// below when its middle is (for Prometheus' cumulative buckets, whose
    /// edges need not fall on ours).
    pub fn count_at_or_below(&self, edge: f64) -> u64 {
        self.buckets
            .iter()
            .take_while(|&&(bucket, _)| bucket_value(bucket) <= edge)
            .fold(0u64, |sum, &(_, count)| sum.saturating_add(count))
    }

    /// The bytes stored in the shared dict: version, count, sum, max, then
    /// (bucket gap, count) pairs, integers as LEB128 varints.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT_VERSION);
        put_varint(out, self.count);
        out.extend_from_slice(&self.sum.to_le_bytes());
        out.extend_from_slice(&self.max.to_le_bytes());
        put_varint(out, self.buckets.len() as u64);
        let mut previous = 0u16;
        for &(bucket, count) in &self.buckets {
            put_varint(out, u64::from(bucket - previous));
            put_varint(out, count);
            previous = bucket;
        }
    }

    /// Reads what [`Histogram::encode`] wrote. An empty input is an empty
    /// histogram (a key with no record yet).
    pub fn decode(bytes: &[u8]) -> Result<Histogram, CorruptRecord> {
        if bytes.is_empty() {
            return Ok(Histogram::new());
        }
        let mut reader = Reader { bytes, at: 0 };
        if reader.byte()? != FORMAT_VERSION {
            return Err(CorruptRecord);
        }
        let count = reader.varint()?;
        let sum = reader.f64()?;
        let max = reader.f64()?;
        let valid = |x: f64| x.is_finite() && x >= 0.0;
        if !valid(sum) || !valid(max) {
            return Err(CorruptRecord);
        }
        let len = reader.varint()?;
        if len > u64::from(BUCKETS) {
            return Err(CorruptRecord);
        }
        let mut buckets = Vec::with_capacity(len as usize);
        let mut bucket = 0u64;
        for i in 0..len {
            let gap = reader.varint()?;
            if i > 0 && gap == 0 {
                return Err(CorruptRecord);
            }
            bucket = bucket.checked_add(gap).ok_or(CorruptRecord)?;
            if bucket >= u64::from(BUCKETS) {
                return Err(CorruptRecord);
            }
            let n = reader.varint()?;
            buckets.push((bucket as u16, n));
        }
        if reader.at != bytes.len() {
            return Err(CorruptRecord);
        }
        Ok(Histogram {
            count,
            sum,
            max,
            buckets,
        })
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, CorruptRecord> {
        let b = *self.bytes.get(self.at).ok_or(CorruptRecord)?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, CorruptRecord> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CorruptRecord)
    }

    fn f64(&mut self) -> Result<f64, CorruptRecord> {
        let end = self.at.checked_add(8).ok_or(CorruptRecord)?;
        let raw = self.bytes.get(self.at..end).ok_or(CorruptRecord)?;
        self.at = end;
        let mut le = [0u8; 8];
        le.copy_from_slice(raw);
        Ok(f64::from_le_bytes(le))
    }
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
                assert!(error <= 1.0 / 64.0 + 1e-12, "{} off by {}", value, error);
            }
            previous = bucket;
            value *= 1.013;
        }
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(1e300), BUCKETS - 1);
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
    fn merging_is_the_same_as_recording_everything_in_one() {
        let mut rng = Lcg(3);
        let (mut a, mut b, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for i in 0..10_000 {
            let v = rng.next_f64() * 300.0;
            if i % 3 == 0 { &mut a } else { &mut b }.record(v);
            all.record(v);
        }
        let mut merged = b.clone();
        merged.merge(&a);
        a.merge(&b);
        assert_eq!(merged.buckets, all.buckets);
        assert_eq!(a.buckets, all.buckets);
        assert_eq!(merged.count, all.count);
        assert_eq!(merged.max, all.max);
        assert!((merged.sum - all.sum).abs() < 1e-6);
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let mut h = Histogram::new();
        for v in [0.0, 0.5, 12.0, 12.1, 3000.0, 1e12] {
            h.record(v);
        }
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        assert_eq!(Histogram::decode(&bytes), Ok(h.clone()));
        assert_eq!(Histogram::decode(&[]), Ok(Histogram::new()));

        for cut in 0..bytes.len() {
            if cut > 0 {
                assert_eq!(Histogram::decode(&bytes[..cut]), Err(CorruptRecord));
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Histogram::decode(&longer), Err(CorruptRecord));
        let mut wrong_version = bytes;
        wrong_version[0] = 9;
        assert_eq!(Histogram::decode(&wrong_version), Err(CorruptRecord));
        assert_eq!(Histogram::decode(b"hello"), Err(CorruptRecord));
    }

    #[test]
    fn huge_values_and_huge_records_stay_finite() {
        let mut h = Histogram::new();
        h.record(1e308);
        h.record(1e308);
        assert_eq!(h.max, MAX_VALUE);
        assert_eq!(h.sum, 2.0 * MAX_VALUE);
        let mut foreign = Histogram::new();
        foreign.sum = f64::MAX;
        foreign.count = u64::MAX;
        h.merge(&foreign);
        assert!(h.sum.is_finite());
        assert_eq!(h.count, u64::MAX);
        let mut bytes = Vec::new();
        h.encode(&mut bytes);
        assert_eq!(Histogram::decode(&bytes), Ok(h));
    }

    #[test]
    fn a_bucket_gap_that_overflows_is_corrupt() {
        let mut bytes = vec![FORMAT_VERSION, 1];
        bytes.extend_from_slice(&1.0f64.to_le_bytes());
        bytes.extend_from_slice(&1.0f64.to_le_bytes());
        bytes.push(2); // two buckets
        bytes.extend_from_slice(&[5, 1]); // bucket 5
        bytes.extend_from_slice(&[0xff; 9]); // a gap near u64::MAX
        bytes.extend_from_slice(&[0x01, 1]);
        assert_eq!(Histogram::decode(&bytes), Err(CorruptRecord));
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
    fn cumulative_counts_for_prometheus() {
        let mut h = Histogram::new();
        for v in [1.0, 4.0, 4.0, 9.0, 100.0] {
            h.record(v);
        }
        assert_eq!(h.count_at_or_below(0.5), 0);
        assert_eq!(h.count_at_or_below(5.0), 3);
        assert_eq!(h.count_at_or_below(10.0), 4);
        assert_eq!(h.count_at_or_below(f64::INFINITY), 5);
    }
}
