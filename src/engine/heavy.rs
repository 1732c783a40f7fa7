//! Heavy-hitter admission for the request counter (issue 12, part 3): a
//! flood of one-hit keys past `max_keys` cannot hide a key with real
//! traffic (docs/engine.md, "Admission past max_keys").
//!
//! A request for a key refused by the cap is counted under the overflow key
//! (as before) and in a count-min sketch kept in one record of the engine
//! (key [`SKETCH_KEY`]):
//!
//! ```text
//! 0          increments since the sketch was made (halved every
//!            `columns / 2`)
//! 1          requests refused by the cap (each counted in the sketch)
//! 2          of those, the first of their key (the estimate was 1 after
//!            it): about how many keys were refused; collisions hide some
//! 3          keys admitted, 4 keys evicted
//! 5          evictions this second: second << 32 | how many
//! 6..8       unused
//! 8..        ROWS rows of `columns` counters, one word each
//! ```
//!
//! Counters are only added to (plain count-min: an estimate is never below
//! the requests counted since the last halving) and halved every
//! `columns / 2` increments, so an old flood fades and the counters hold
//! half a request on average at most.
//! A key whose estimate reaches a victim's total count plus [`MARGIN`]
//! takes its place: the victim (the smallest of a few tracked keys sampled
//! from the index) is removed and folded into the overflow key, and the key
//! is made, its record counting from 0 with the estimate (minus the request
//! at hand) kept as its error bound in a one-cell record (key
//! [`ERROR_PREFIX`] + the key): requests it may have had under the
//! overflow key before. A one-hit key's estimate is 1 plus collisions:
//! with counters at half a request on average at most, 4 rows all at 3 or
//! more is a chance of some 1 in 20 million a key. At most [`EVICTIONS_PER_SECOND`]
//! evictions a second per engine bound the records waiting for reuse.

use std::sync::atomic::Ordering::{Acquire, Relaxed};

use super::requests::{self, Layout, Requests, Roller};
use super::table::{Owner, Record, Table};
use super::word::Word;
use super::Error;

/// The sketch's record key (never a request key: a 0 byte second).
pub const SKETCH_KEY: &[u8] = b"r\0sketch";

/// An admitted key's error bound record: this prefix, then the key (without
/// the kind byte); one cell. Two 0 bytes: no other record of the engine
/// ("r\0keys", "r\0edges", [`SKETCH_KEY`]) starts so, whatever the key.
pub const ERROR_PREFIX: &[u8] = b"r\0\0";

/// Rows of the sketch: the estimate is the smallest of a key's counters.
pub const ROWS: usize = 4;

/// The most and the fewest counters a row; the sketch takes at most a
/// 16th of the arena.
pub const MAX_COLUMNS: usize = 4096;
pub const MIN_COLUMNS: usize = 64;

/// How many requests more than its victim a key must have shown.
pub const MARGIN: u64 = 3;

/// Evictions a second per engine at most: records removed wait
/// [`super::table::GRACE_SECONDS`] before reuse, so at most
/// `EVICTIONS_PER_SECOND * (GRACE_SECONDS + 1)` of them wait at once. Each
/// eviction in a second doubles the margin the next one needs.
pub const EVICTIONS_PER_SECOND: u64 = 8;

/// Tracked keys sampled for a victim, and the index slots looked at a run
/// to find them (from a slot that changes with each request).
pub const SAMPLES: usize = 5;
pub const SAMPLE_SLOTS: usize = 256;

const H_INCREMENTS: usize = 0;
const H_REFUSED: usize = 1;
const H_NEW: usize = 2;
const H_ADMITTED: usize = 3;
const H_EVICTED: usize = 4;
const H_SECOND: usize = 5;
const HEADER: usize = 8;

/// The sketch's columns for an arena of `arena_words`: a power of two,
/// None when even [`MIN_COLUMNS`] would take more than a 16th of it.
pub fn columns_for(arena_words: u64) -> Option<usize> {
    let room = (arena_words / 16) as usize;
    let mut columns = MAX_COLUMNS;
    while columns >= MIN_COLUMNS {
        if HEADER + ROWS * columns <= room {
            return Some(columns);
        }
        columns /= 2;
    }
    None
}

/// The sketch record's width for `columns` counters a row.
pub fn width(columns: usize) -> u32 {
    (HEADER + ROWS * columns) as u32
}

/// What the sketch says of the flood.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Requests refused by the cap (under the overflow key).
    pub refused_requests: u64,
    /// About how many keys they were (first sightings).
    pub refused_keys: u64,
    pub admitted: u64,
    pub evicted: u64,
}

/// The sketch's cells.
#[derive(Debug, Clone, Copy)]
pub struct Sketch<'a, W: Word> {
    cells: &'a [W],
    columns: usize,
}

impl<'a, W: Word> Sketch<'a, W> {
    /// None when `cells` is no sketch's (its width gives the columns).
    pub fn new(cells: &'a [W]) -> Option<Sketch<'a, W>> {
        let columns = cells.len().checked_sub(HEADER)? / ROWS;
        if columns < MIN_COLUMNS
            || !columns.is_power_of_two()
            || cells.len() != width(columns) as usize
        {
            return None;
        }
        Some(Sketch { cells, columns })
    }

    fn counter(&self, hash: u64, row: usize) -> &'a W {
        // 16 bits of the key's hash a row (columns <= 2^16).
        let column = (hash >> (16 * row)) as usize & (self.columns - 1);
        &self.cells[HEADER + row * self.columns + column]
    }

    /// Counts one refused request of the key of `hash`: its estimate after.
    pub fn add(&self, hash: u64) -> u64 {
        let mut estimate = u64::MAX;
        for row in 0..ROWS {
            estimate = estimate.min(self.counter(hash, row).fetch_add(1, Relaxed) + 1);
        }
        self.cells[H_REFUSED].fetch_add(1, Relaxed);
        if estimate == 1 {
            self.cells[H_NEW].fetch_add(1, Relaxed);
        }
        let done = self.cells[H_INCREMENTS].fetch_add(1, Relaxed) + 1;
        if done % self.period() == 0 {
            self.halve();
        }
        estimate
    }

    /// Increments between halvings: half the columns, so that a counter
    /// holds half a request on average at most, and a one-hit key finds all
    /// its counters at 3 or more (an estimate that beats a tracked key of
    /// one request) with a chance of some 1 in 20 million.
    pub fn period(&self) -> u64 {
        self.columns as u64 / 2
    }

    /// The key of `hash`'s estimate.
    pub fn estimate(&self, hash: u64) -> u64 {
        (0..ROWS)
            .map(|row| self.counter(hash, row).load(Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Every counter halved (an add meanwhile is kept, or halved with it).
    fn halve(&self) {
        for cell in &self.cells[HEADER..] {
            let mut value = cell.load(Relaxed);
            while value > 0 {
                match cell.compare_exchange(value, value / 2, Relaxed, Relaxed) {
                    Ok(_) => break,
                    Err(now) => value = now,
                }
            }
        }
    }

    /// Takes one of this second's evictions for a key whose estimate is
    /// `surplus` above its victim's count: false when
    /// [`EVICTIONS_PER_SECOND`] were taken in second `second`, or the
    /// surplus is below [`MARGIN`] doubled for each taken, up to half the
    /// [`Sketch::period`] (so that keys of a few requests each, arriving
    /// first, cannot take a second's evictions from a key with hundreds).
    pub fn take_eviction(&self, second: u64, surplus: u64) -> bool {
        let cell = &self.cells[H_SECOND];
        let second = second & 0xFFFF_FFFF;
        let mut word = cell.load(Relaxed);
        loop {
            let taken = if word >> 32 == second {
                word & 0xFFFF_FFFF
            } else {
                0
            };
            // Up to half the halving period: an estimate can reach that.
            let margin = (MARGIN << taken).min(self.period() / 2).max(MARGIN);
            if taken >= EVICTIONS_PER_SECOND || surplus < margin {
                return false;
            }
            let next = (second << 32) | (taken + 1);
            match cell.compare_exchange(word, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(now) => word = now,
            }
        }
    }

    pub fn figures(&self) -> Figures {
        Figures {
            refused_requests: self.cells[H_REFUSED].load(Relaxed),
            refused_keys: self.cells[H_NEW].load(Relaxed),
            admitted: self.cells[H_ADMITTED].load(Relaxed),
            evicted: self.cells[H_EVICTED].load(Relaxed),
        }
    }
}

/// The engine's sketch record, made at the first refused request: None
/// when the engine is too small for one (or has no room left).
pub fn sketch<'a, W: Word>(table: &Table<'a, W>) -> Option<Sketch<'a, W>> {
    let columns = columns_for(table.stats().arena_total)?;
    let record = match table.lookup(SKETCH_KEY) {
        Some(record) => record,
        None => table.get_or_insert(SKETCH_KEY, width(columns)).ok()?.0,
    };
    Sketch::new(record.cells())
}

/// The sketch as it is, if made.
pub fn existing_sketch<'a, W: Word>(table: &Table<'a, W>) -> Option<Sketch<'a, W>> {
    table
        .lookup(SKETCH_KEY)
        .and_then(|r| Sketch::new(r.cells()))
}

/// The error record's key of request key `key` (kind byte included).
pub fn error_key(key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(ERROR_PREFIX);
    out.extend_from_slice(key.get(1..).unwrap_or_default());
}

/// The error bound kept for request key `key` (kind byte included): 0 for
/// a key that was never admitted past the cap.
pub fn error_of<W: Word>(table: &Table<'_, W>, key: &[u8], scratch: &mut Vec<u8>) -> u64 {
    error_key(key, scratch);
    table
        .lookup(scratch)
        .filter(|r| r.width() == 1)
        .map_or(0, |r| r.cells()[0].load(Relaxed))
}

/// Removes request key `key`'s error record, if any (under the table lock,
/// as `owner`).
///
/// # Errors
///
/// As [`Table::remove_if`].
pub fn forget_error<W: Word>(
    table: &Table<'_, W>,
    key: &[u8],
    owner: &impl Owner,
    scratch: &mut Vec<u8>,
) -> Result<(), Error> {
    error_key(key, scratch);
    table
        .remove_if(scratch, owner, |r| r.width() == 1)
        .map(|_| ())
}

/// A request for a key refused by the cap: what [`admit`] needs.
pub struct Refused<'k> {
    /// The key, kind byte included.
    pub key: &'k [u8],
    /// The overflow key, kind byte included (made before: its record holds
    /// what evicted keys counted).
    pub overflow: &'k [u8],
    pub layout: Layout,
    pub edges_ms: &'k [f64],
    pub max_keys: u64,
    /// Seconds, for the evictions a second.
    pub second: u64,
}

/// Whether `record` may be evicted for the refused key: a request key of
/// this layout, not "all", the overflow key, nor the refused key itself
/// (admitted by another worker since this one looked).
fn is_victim<W: Word>(record: &Record<'_, W>, refused: &Refused<'_>, name: &mut Vec<u8>) -> bool {
    if record.width() != refused.layout.width() {
        return false;
    }
    name.clear();
    record.key_into(name);
    requests::is_request_key(name)
        && &name[1..] != b"all"
        && &name[..] != refused.overflow
        && &name[..] != refused.key
}

/// The smallest (by total count) of up to [`SAMPLES`] tracked keys found
/// in the index from slot `start` on, leaving out keys with no request
/// yet: its key and count.
fn victim<W: Word>(
    table: &Table<'_, W>,
    refused: &Refused<'_>,
    start: usize,
) -> Option<(Vec<u8>, u64)> {
    let slots = table.index_slots();
    let mut offsets = Vec::new();
    let mut at = start % slots;
    let mut looked = 0;
    // Slots a run, until enough records are found (request records of
    // this layout are most of them) or the whole index was looked at.
    while looked < slots && offsets.len() < 4 * SAMPLES {
        let end = (at + SAMPLE_SLOTS).min(slots);
        table.offsets_in_slots(at..end, &mut offsets);
        looked += end - at;
        at = end % slots;
    }
    let mut name = Vec::new();
    let mut best: Option<(Vec<u8>, u64)> = None;
    let mut sampled = 0;
    for offset in offsets {
        let record = table.record_in_arena(offset);
        if !is_victim(&record, refused, &mut name) {
            continue;
        }
        let count = Requests::with_edges(record.cells(), refused.layout, refused.edges_ms)
            .map_or(0, |r| r.count());
        if count == 0 {
            // Made, and its first request on its way to it (or a record
            // not of this layout): a write after the fold would be lost.
            continue;
        }
        if best.as_ref().map_or(true, |(_, least)| count < *least) {
            best = Some((name.clone(), count));
        }
        sampled += 1;
        if sampled == SAMPLES {
            break;
        }
    }
    best
}

/// A request for a key that `max_keys` refused: counted in `sketch` (the
/// table's, [`sketch`]);
/// when its estimate beats a sampled victim's count by [`MARGIN`], the
/// victim is removed (folded into the overflow key, its place given back)
/// and the key made in its place. The key's record (and whether this call
/// made it), or None: the request goes to the overflow key.
///
/// # Errors
///
/// `Busy` and the like from the table's lock: the caller records under the
/// overflow key.
pub fn admit<'a, W: Word>(
    table: &Table<'a, W>,
    sketch: &Sketch<'_, W>,
    owner: &impl Owner,
    roller: &impl Roller,
    refused: &Refused<'_>,
) -> Result<Option<(Record<'a, W>, bool)>, Error> {
    let hash = table.hash(refused.key);
    let estimate = sketch.add(hash);
    if estimate < MARGIN + 1 {
        // Every tracked key has a count of 1 or more: no need to look.
        return Ok(None);
    }
    if let Some(record) = table.lookup(refused.key) {
        // Admitted by another worker meanwhile.
        return Ok(Some((record, false)));
    }
    // Another start each request of the key: another sample.
    let start = (hash >> 32).wrapping_add(estimate.wrapping_mul(0x9E37_79B9)) as usize;
    let (victim_key, victim_count) = match victim(table, refused, start) {
        Some(found) => found,
        None => return Ok(None),
    };
    if !sketch.take_eviction(refused.second, estimate.saturating_sub(victim_count)) {
        return Ok(None);
    }
    let overflow = match table.lookup(refused.overflow) {
        Some(record) => record,
        None => return Ok(None),
    };
    let layout = refused.layout;
    let edges_ms = refused.edges_ms;
    let mut removed = None;
    // Removed only if no request came in since it was sampled.
    let gone = table.remove_if(&victim_key, owner, |record| {
        let still = Requests::with_edges(record.cells(), layout, edges_ms)
            .map_or(false, |r| r.count() == victim_count);
        if still {
            removed = Some(record.offset());
        }
        still
    })?;
    let offset = match removed {
        Some(offset) if gone => offset,
        _ => return Ok(None),
    };
    let keys = table.get_or_insert(requests::KEYS_KEY, 1)?.0;
    requests::unregister(&keys.cells()[0]);
    // The removed record stays readable (its space is not reused before
    // the grace period): fold what it counted into the overflow key.
    let victim_record = table.record_in_arena(offset as u32);
    if let (Some(from), Some(into)) = (
        Requests::with_edges(victim_record.cells(), layout, edges_ms),
        Requests::with_edges(overflow.cells(), layout, edges_ms),
    ) {
        into.fold(&from, roller);
    }
    sketch.cells[H_EVICTED].fetch_add(1, Relaxed);
    let mut scratch = Vec::new();
    forget_error(table, &victim_key, owner, &mut scratch)?;

    if !requests::register(&keys.cells()[0], refused.max_keys) {
        // Another new key took the place meanwhile.
        return Ok(None);
    }
    let made = table.get_or_insert_by(refused.key, layout.width(), owner);
    match made {
        Ok((record, true)) => {
            sketch.cells[H_ADMITTED].fetch_add(1, Relaxed);
            error_key(refused.key, &mut scratch);
            if let Ok((error, _)) = table.get_or_insert_by(&scratch, 1, owner) {
                // The requests this key may have had under the overflow
                // key: the estimate, but for the request at hand.
                error.cells()[0].store(estimate - 1, Relaxed);
            }
            Ok(Some((record, true)))
        }
        other => {
            requests::unregister(&keys.cells()[0]);
            other.map(Some)
        }
    }
}

/// The record a request for `refused.key` goes to, as the request
/// counter finds it when its worker has no cells for the key
/// (lua/resty/counter/requests.lua's key_cells, through `rc_requests_key`
/// and `rc_requests_admit`): the key's own, made under `max_keys`, or
/// admitted past it; None: the overflow key's. For tests and fuzzing of
/// the path as a whole.
///
/// # Errors
///
/// As [`Table::get_or_insert`] and [`admit`].
pub fn key_record<'a, W: Word>(
    table: &Table<'a, W>,
    owner: &impl Owner,
    roller: &impl Roller,
    refused: &Refused<'_>,
) -> Result<Option<Record<'a, W>>, Error> {
    if let Some(record) = table.lookup(refused.key) {
        return Ok(Some(record));
    }
    let keys = table.get_or_insert_by(requests::KEYS_KEY, 1, owner)?.0;
    if requests::register(&keys.cells()[0], refused.max_keys) {
        let made = table.get_or_insert_by(refused.key, refused.layout.width(), owner);
        if !matches!(made, Ok((_, true))) {
            requests::unregister(&keys.cells()[0]);
        }
        return made.map(|(record, _)| Some(record));
    }
    match sketch(table) {
        Some(sketch) => Ok(admit(table, &sketch, owner, roller, refused)?.map(|(r, _)| r)),
        None => Ok(None),
    }
}

/// The sketch's figures, and the error bound of every admitted key (kind
/// byte excluded) into `errors`: a walk of every record at once (tests and
/// fuzzing; a report reads the error records in its stepped walk).
pub fn figures<W: Word>(table: &Table<'_, W>, errors: &mut Vec<(Vec<u8>, u64)>) -> Figures {
    errors.clear();
    let mut name = Vec::new();
    for record in table.records() {
        if record.width() != 1 || record.key_len() <= ERROR_PREFIX.len() {
            continue;
        }
        name.clear();
        record.key_into(&mut name);
        if name.starts_with(ERROR_PREFIX) {
            let error = record.cells()[0].load(Acquire);
            errors.push((name[ERROR_PREFIX.len()..].to_vec(), error));
        }
    }
    errors.sort();
    existing_sketch(table).map_or_else(Figures::default, |s| s.figures())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lock::Holder;
    use crate::histogram::PROMETHEUS_EDGES_MS;
    use std::sync::atomic::AtomicU64;

    /// Each thread a holder of its own, never dead.
    struct Me(u32);

    impl Owner for Me {
        fn me(&self) -> Holder {
            Holder {
                pid: self.0,
                instance: 1,
            }
        }
        fn alive(&self, _: u32) -> bool {
            true
        }
    }

    impl Roller for Me {
        fn me(&self) -> Holder {
            Owner::me(self)
        }
        fn alive(&self, _: u32) -> bool {
            true
        }
    }

    fn region(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    const OVERFLOW: &[u8] = b"r_overflow";

    fn layout() -> Layout {
        Layout::new(3, false).unwrap()
    }

    /// One request for `key` as the request counter makes it: whether it
    /// went to a record of its own (else the overflow key's).
    fn request(
        table: &Table<'_, AtomicU64>,
        me: &Me,
        key: &[u8],
        max_keys: u64,
        second: u64,
    ) -> bool {
        let layout = layout();
        let overflow = table.get_or_insert(OVERFLOW, layout.width()).unwrap().0;
        let refused = Refused {
            key,
            overflow: OVERFLOW,
            layout,
            edges_ms: &PROMETHEUS_EDGES_MS,
            max_keys,
            second,
        };
        let own = key_record(table, me, me, &refused).unwrap();
        let cells = own.as_ref().unwrap_or(&overflow).cells();
        let record = Requests::new(cells, layout).unwrap();
        record.record(second / 60, 1.0, me);
        own.is_some()
    }

    fn count(table: &Table<'_, AtomicU64>, key: &[u8]) -> u64 {
        table
            .lookup(key)
            .and_then(|r| Requests::new(r.cells(), layout()).map(|r| r.count()))
            .unwrap_or(0)
    }

    /// The counts of every request key and the overflow's.
    fn sum_of_counts(table: &Table<'_, AtomicU64>) -> u64 {
        let mut name = Vec::new();
        table
            .records()
            .filter(|r| r.width() == layout().width())
            .map(|r| {
                name.clear();
                r.key_into(&mut name);
                assert!(requests::is_request_key(&name));
                Requests::new(r.cells(), layout()).unwrap().count()
            })
            .sum()
    }

    #[test]
    fn an_estimate_is_never_below_the_count_until_halved() {
        let words = region(1 << 16);
        let table = Table::init(&words, [5, 6], 0).unwrap();
        let sketch = sketch(&table).unwrap();
        assert_eq!(sketch.columns, 512);
        let mut truth = std::collections::HashMap::new();
        // Fewer adds than a halving period (256).
        for i in 0..250u64 {
            let hash = table.hash(format!("k{}", i % 97).as_bytes());
            let estimate = sketch.add(hash);
            let seen = truth.entry(hash).or_insert(0u64);
            *seen += 1;
            assert!(estimate >= *seen);
            assert_eq!(sketch.estimate(hash), estimate);
        }
        let f = sketch.figures();
        assert_eq!(f.refused_requests, 250);
        assert!(f.refused_keys <= 97 && f.refused_keys >= 90, "{:?}", f);
        // The 512th add halves every counter (the second halving).
        let hot = table.hash(b"hot");
        for _ in 250..511 {
            sketch.add(hot);
        }
        let before: u64 = sketch.cells[HEADER..].iter().map(|c| c.load(Relaxed)).sum();
        let hot_before = sketch.estimate(hot) + 1;
        sketch.add(hot);
        assert_eq!(sketch.estimate(hot), hot_before / 2);
        let after: u64 = sketch.cells[HEADER..].iter().map(|c| c.load(Relaxed)).sum();
        assert!(after <= (before + ROWS as u64) / 2, "{} {}", before, after);
    }

    #[test]
    fn a_flood_of_one_hit_keys_cannot_hide_a_real_key() {
        let words = region(1 << 16);
        let table = Table::init(&words, [7, 8], 0).unwrap();
        let me = Me(1);
        let max_keys = 100;
        let mut requests = 0;
        // The cap fills with one-hit keys, then 50,000 more...
        for i in 0..50_000 {
            request(
                &table,
                &me,
                format!("rflood{}", i).as_bytes(),
                max_keys,
                i / 1000,
            );
            requests += 1;
        }
        let evicted_by_flood = existing_sketch(&table).unwrap().figures().evicted;
        // ... then 2,000 requests of a real key, each after 2 flood keys.
        let mut own = 0;
        for i in 0..2_000u64 {
            for j in 0..2 {
                let key = format!("rmore{}", 2 * i + j);
                request(&table, &me, key.as_bytes(), max_keys, 50 + i / 1000);
            }
            if request(&table, &me, b"rlogin", max_keys, 50 + i / 1000) {
                own += 1;
            }
            requests += 3;
        }
        let login = count(&table, b"rlogin");
        assert_eq!(login, own);
        assert!(login >= 1_990, "login counted {} of 2000", login);
        let mut scratch = Vec::new();
        let error = error_of(&table, b"rlogin", &mut scratch);
        assert!(
            2_000 - login <= error,
            "{} missing, error {}",
            2_000 - login,
            error
        );
        // Every request is counted somewhere.
        assert_eq!(sum_of_counts(&table), requests);
        let f = existing_sketch(&table).unwrap().figures();
        assert!(f.refused_keys > 40_000, "{:?}", f);
        // One-hit keys churned (almost) nothing: few evictions in all.
        assert!(
            evicted_by_flood <= 5,
            "{} evicted by the flood",
            evicted_by_flood
        );
        assert!(f.evicted <= 10, "{:?}", f);
        assert!(f.admitted >= 1);
        assert_eq!(registered(&table), max_keys);
    }

    fn registered(table: &Table<'_, AtomicU64>) -> u64 {
        table.lookup(requests::KEYS_KEY).unwrap().cells()[0].load(Relaxed)
    }

    #[test]
    fn evictions_are_bounded_per_second() {
        let words = region(1 << 16);
        let table = Table::init(&words, [1, 1], 0).unwrap();
        let me = Me(1);
        // The cap full of one-hit keys, then 30 keys of 500 requests each
        // (one after the other), all in one second: the n-th admitted needs
        // an estimate of 1 + 3 * 2^n (at most 1 + 128: a quarter of the
        // 512 columns), so 8 are.
        for i in 0..50 {
            request(&table, &me, format!("rone{}", i).as_bytes(), 50, 0);
        }
        let mut own = 0;
        for i in 0..30 {
            for _ in 0..500 {
                if request(&table, &me, format!("rbig{}", i).as_bytes(), 50, 1) {
                    own += 1;
                }
            }
        }
        let f = existing_sketch(&table).unwrap().figures();
        assert_eq!(f.evicted, EVICTIONS_PER_SECOND);
        assert_eq!(f.admitted, EVICTIONS_PER_SECOND);
        // The first admitted after 4 requests, the 8th after some 130
        // (halvings of the sketch on the way may delay one).
        assert!(
            own >= 8 * 500 - 2 * (3 + 6 + 12 + 24 + 48 + 96 + 128 + 128),
            "{}",
            own
        );
        assert!(
            own <= 8 * 500 - (3 + 6 + 12 + 24 + 48 + 96 + 128 + 128),
            "{}",
            own
        );
        // Keys of 10 requests each in the next second: only 2 (estimates
        // 4 and 7 reached); keys of 500 take the rest.
        for i in 0..6 {
            for _ in 0..10 {
                request(&table, &me, format!("rten{}", i).as_bytes(), 50, 2);
            }
        }
        let f = existing_sketch(&table).unwrap().figures();
        assert_eq!(f.evicted, EVICTIONS_PER_SECOND + 2);
        for i in 8..9 {
            for _ in 0..500 {
                request(&table, &me, format!("rbig{}", i).as_bytes(), 50, 2);
            }
        }
        let f = existing_sketch(&table).unwrap().figures();
        assert_eq!(f.evicted, EVICTIONS_PER_SECOND + 3);
        assert_eq!(sum_of_counts(&table), 50 + 30 * 500 + 60 + 500);
        assert_eq!(registered(&table), 50);
    }

    #[test]
    fn an_evicted_admitted_key_loses_its_error_record() {
        let words = region(1 << 16);
        let table = Table::init(&words, [2, 3], 0).unwrap();
        let me = Me(1);
        // The engine's other one-cell records are no error records.
        table.get_or_insert(requests::EDGES_KEY, 1).unwrap();
        request(&table, &me, b"rone", 1, 0);
        for _ in 0..4 {
            request(&table, &me, b"rtwo", 1, 1);
        }
        assert!(table.lookup(b"rone").is_none());
        let mut scratch = Vec::new();
        assert_eq!(error_of(&table, b"rtwo", &mut scratch), 3);
        let mut errors = Vec::new();
        let f = figures(&table, &mut errors);
        assert_eq!(errors, vec![(b"two".to_vec(), 3)]);
        assert_eq!((f.admitted, f.evicted), (1, 1));
        // "two" has 1 request of its own: three's 5th beats it (>= 1 + 3).
        for _ in 0..5 {
            request(&table, &me, b"rthree", 1, 2);
        }
        assert!(table.lookup(b"rtwo").is_none());
        assert_eq!(error_of(&table, b"rtwo", &mut scratch), 0);
        figures(&table, &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, b"three".to_vec());
        // one (1) and two (1) folded into the overflow with three's first 4.
        assert_eq!(count(&table, OVERFLOW), 1 + 3 + 1 + 3);
        assert_eq!(sum_of_counts(&table), 1 + 4 + 5);
    }

    #[test]
    fn threads_admitting_at_once_make_one_record_and_lose_nothing() {
        let words = region(1 << 16);
        let table = Table::init(&words, [4, 4], 0).unwrap();
        for i in 0..20 {
            request(&table, &Me(1), format!("rone{}", i).as_bytes(), 20, 0);
        }
        let own = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (table, own) = (&table, &own);
                s.spawn(move || {
                    let me = Me(100 + t);
                    for i in 0..2_000u64 {
                        if request(table, &me, b"rhot", 20, 1) {
                            own.fetch_add(1, Relaxed);
                        }
                        let flood = format!("rf{}-{}", t, i);
                        request(table, &me, flood.as_bytes(), 20, 1);
                    }
                });
            }
        });
        assert_eq!(count(&table, b"rhot"), own.load(Relaxed));
        assert!(own.load(Relaxed) >= 8_000 - 4 * 10);
        assert_eq!(sum_of_counts(&table), 20 + 16_000);
        assert_eq!(registered(&table), 20);
    }
}
