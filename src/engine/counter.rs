//! `resty.counter`'s records in the engine: one per key, written by every
//! worker, copied to the shared dict by a sync.
//!
//! Cells:
//!
//! - 0, the integer sum: exact, kept within +-(2^53 - 1) so that the value
//!   a dict (a double) mirrors is exact too;
//! - 1, the fractional sum (`f64` bits);
//! - 2, the base: what the dict held for the key when the engine first saw
//!   it (counts from before the engine, e.g. a reload from an older
//!   version), stored as `!bits` so that 0 means "not imported yet"; or
//!   [`FOREIGN`] when the dict held something else than a number there
//!   (another user of the dict owns the key: its value is not overwritten
//!   while it stays so);
//! - 3, the mirror: the value last written to the dict, `!bits` likewise
//!   (0: never written). Only a sync holding the mirror lock writes it.
//!
//! A key's value is integer + fractional + base, the same in every worker
//! the moment any worker adds to it.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use super::cell::load_f64;
use super::word::Word;
use super::Error;

/// The first byte of every counter key in the table.
pub const KIND: u8 = b'c';

/// Cells per counter record.
pub const WIDTH: u32 = 4;

/// The largest integer a double holds exactly.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The base cell of a key whose dict value is not a number.
const FOREIGN: u64 = 1;

const INTEGER: usize = 0;
const FRACTIONAL: usize = 1;
const BASE: usize = 2;
const MIRROR: usize = 3;

/// CRC-32 (IEEE, reflected: zlib's) of each byte value, for [`dict_hash`].
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The hash nginx's shared dict files `key` under (`ngx_crc32_short`, the
/// CRC-32 of zlib): its red-black tree is ordered by it.
pub fn dict_hash(key: &[u8]) -> u32 {
    !key.iter().fold(!0u32, |crc, &byte| {
        CRC32_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// A counter record's cells.
#[derive(Debug, Clone, Copy)]
pub struct Counter<'a, W: Word> {
    cells: &'a [W],
}

fn encode(value: f64) -> u64 {
    !value.to_bits()
}

/// Within +-(2^53 - 1), where a double holds every integer (NaN and the
/// infinities are not).
fn in_exact_range(value: f64) -> bool {
    value.is_finite() && value.abs() <= MAX_SAFE_INTEGER as f64
}

fn decode(word: u64) -> Option<f64> {
    if word == 0 {
        None
    } else {
        Some(f64::from_bits(!word))
    }
}

impl<'a, W: Word> Counter<'a, W> {
    /// # Panics
    ///
    /// When `cells` is not [`WIDTH`] long (the table gives every record
    /// of this kind that width).
    pub fn new(cells: &'a [W]) -> Counter<'a, W> {
        assert_eq!(cells.len(), WIDTH as usize, "not a counter record");
        Counter { cells }
    }

    /// The value's parts other than the one `changing`, as they are now.
    fn others(&self, changing: usize) -> f64 {
        let integer = if changing == INTEGER {
            0.0
        } else {
            (self.cells[INTEGER].load(Relaxed) as i64) as f64
        };
        let fractional = if changing == FRACTIONAL {
            0.0
        } else {
            load_f64(&self.cells[FRACTIONAL])
        };
        integer + fractional + self.base()
    }

    /// Adds an integer step, keeping the value exact: the sum with the
    /// fractional part and the base stays within +-(2^53 - 1).
    ///
    /// # Errors
    ///
    /// `OutOfExactRange` when it would not; nothing changes then. (An
    /// integer and a fractional step racing each other are each checked
    /// against the other's part as it was: together they may pass the
    /// bound by one step, which the dict mirror then refuses and reports.)
    #[inline]
    pub fn add(&self, step: i64) -> Result<i64, Error> {
        let cell = &self.cells[INTEGER];
        let others = self.others(INTEGER);
        let mut current = cell.load(Relaxed);
        loop {
            let sum = (current as i64)
                .checked_add(step)
                .filter(|&sum| in_exact_range(sum as f64 + others))
                .ok_or(Error::OutOfExactRange)?;
            match cell.compare_exchange(current, sum as u64, Relaxed, Relaxed) {
                Ok(_) => return Ok(sum),
                Err(now) => current = now,
            }
        }
    }

    /// Adds a fractional step (finite: the Lua side checks), keeping the
    /// value within +-(2^53 - 1) as [`add`](Counter::add) does.
    ///
    /// # Errors
    ///
    /// As [`add`](Counter::add).
    pub fn add_fractional(&self, step: f64) -> Result<f64, Error> {
        let cell = &self.cells[FRACTIONAL];
        let others = self.others(FRACTIONAL);
        let mut current = cell.load(Relaxed);
        loop {
            let sum = f64::from_bits(current) + step;
            if !in_exact_range(sum + others) {
                return Err(Error::OutOfExactRange);
            }
            match cell.compare_exchange(current, sum.to_bits(), Relaxed, Relaxed) {
                Ok(_) => return Ok(sum),
                Err(now) => current = now,
            }
        }
    }

    fn base(&self) -> f64 {
        match self.cells[BASE].load(Relaxed) {
            FOREIGN => 0.0,
            word => decode(word).unwrap_or(0.0),
        }
    }

    /// The key's value, as every worker sees it now (NaN for a
    /// [`foreign`](Counter::is_foreign) key).
    pub fn value(&self) -> f64 {
        if self.is_foreign() {
            return f64::NAN;
        }
        (self.cells[INTEGER].load(Relaxed) as i64) as f64
            + load_f64(&self.cells[FRACTIONAL])
            + self.base()
    }

    /// Takes the dict's value from before the engine as the key's base:
    /// once, or again while the key is [`foreign`](Counter::is_foreign).
    /// A value that is not a finite number marks the key foreign. True for
    /// the call that changed the base.
    pub fn import_base(&self, base: f64) -> bool {
        let cell = &self.cells[BASE];
        let new = if base.is_finite() {
            encode(base)
        } else {
            FOREIGN
        };
        let taken = cell.compare_exchange(0, new, Relaxed, Relaxed);
        match taken {
            Ok(_) => true,
            Err(FOREIGN) if new != FOREIGN => cell
                .compare_exchange(FOREIGN, new, Relaxed, Relaxed)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Whether [`import_base`](Counter::import_base) has run.
    pub fn has_base(&self) -> bool {
        self.cells[BASE].load(Relaxed) != 0
    }

    /// Whether the dict held something else than a number for the key:
    /// then [`value`](Counter::value) is NaN, and the counts wait in the
    /// engine until the dict's value becomes a number or goes.
    pub fn is_foreign(&self) -> bool {
        self.cells[BASE].load(Relaxed) == FOREIGN
    }

    /// The value last written to the dict, if any.
    pub fn mirror(&self) -> Option<f64> {
        decode(self.cells[MIRROR].load(Relaxed))
    }

    /// Records that `value` is now in the dict. Only the mirror lock's
    /// holder calls it.
    pub fn set_mirror(&self, value: f64) {
        self.cells[MIRROR].store(encode(value), Relaxed);
    }

    /// Adds to the fractional cell without a range check: for tests that
    /// need a value past the exact range.
    #[cfg(test)]
    fn force_fractional(&self, step: f64) {
        super::cell::add_f64(&self.cells[FRACTIONAL], step);
    }
}

/// The progress of the syncs that copy counters into the dict: one word,
/// the count of syncs begun (high half) and the number of the last one
/// that finished with nothing left over (low half), both wrapping. Only
/// the mirror lock's holder begins and finishes a sync.
///
/// It lets a sync that must not leave its caller's counts behind (by
/// hand, at exit) end without walking every record again when the lock is
/// held: a sync begun after the caller's [`ticket`](SyncProgress::ticket)
/// lists every count the caller made before it, so once one such has
/// finished, the dict holds them.
#[derive(Debug, Clone, Copy)]
pub struct SyncProgress<'a, W: Word> {
    word: &'a W,
}

impl<'a, W: Word> SyncProgress<'a, W> {
    pub fn new(word: &'a W) -> SyncProgress<'a, W> {
        SyncProgress { word }
    }

    /// Taken by a sync before it tries the lock: the number of syncs begun
    /// so far. A read-modify-write, so that a sync that begins later (and
    /// so reads this write, Acquire) sees every count made before it.
    pub fn ticket(&self) -> u32 {
        (self.word.fetch_add(0, AcqRel) >> 32) as u32
    }

    /// The lock's holder begins a sync, before it lists what changed: its
    /// number.
    pub fn begin(&self) -> u32 {
        ((self.word.fetch_add(1 << 32, AcqRel) >> 32) as u32).wrapping_add(1)
    }

    /// The lock's holder has copied everything sync `number` listed.
    pub fn finish(&self, number: u32) {
        let mut current = self.word.load(Relaxed);
        loop {
            let new = (current >> 32 << 32) | u64::from(number);
            match self.word.compare_exchange(current, new, Release, Relaxed) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
    }

    /// Whether a sync begun after `ticket` was taken has finished.
    pub fn covers(&self, ticket: u32) -> bool {
        let finished = self.word.load(Acquire) as u32;
        finished.wrapping_sub(ticket) as i32 > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn record() -> Vec<AtomicU64> {
        (0..WIDTH).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_new_record_reads_zero_and_has_no_base_or_mirror() {
        let cells = record();
        let counter = Counter::new(&cells);
        assert_eq!(counter.value(), 0.0);
        assert!(!counter.has_base());
        assert_eq!(counter.mirror(), None);
    }

    #[test]
    fn integer_and_fractional_steps_sum_with_the_base() {
        let cells = record();
        let counter = Counter::new(&cells);
        counter.add(3).unwrap();
        counter.add(-1).unwrap();
        counter.add_fractional(0.5).unwrap();
        assert!(counter.import_base(10.0));
        assert!(!counter.import_base(99.0), "a base is imported once");
        assert_eq!(counter.value(), 12.5);
        // A base of 0 still counts as imported.
        let zero_cells = record();
        let zero = Counter::new(&zero_cells);
        assert!(zero.import_base(0.0));
        assert!(zero.has_base());
    }

    #[test]
    fn a_foreign_key_counts_and_takes_a_base_once_its_dict_value_is_a_number() {
        let cells = record();
        let counter = Counter::new(&cells);
        assert!(counter.import_base(f64::NAN));
        assert!(counter.is_foreign() && counter.has_base());
        counter.add(4).unwrap();
        assert!(counter.value().is_nan());
        assert!(!counter.import_base(f64::INFINITY), "still foreign");
        assert!(counter.import_base(2.0));
        assert!(!counter.is_foreign());
        assert_eq!(counter.value(), 6.0);
        assert!(!counter.import_base(f64::NAN), "a number base stays");
        assert!(!counter.import_base(9.0));
    }

    #[test]
    fn sums_stay_in_the_exact_range() {
        let cells = record();
        let counter = Counter::new(&cells);
        counter.add(MAX_SAFE_INTEGER).unwrap();
        assert_eq!(counter.add(1).unwrap_err(), Error::OutOfExactRange);
        assert_eq!(counter.add(i64::MAX).unwrap_err(), Error::OutOfExactRange);
        assert_eq!(counter.value(), MAX_SAFE_INTEGER as f64);
        counter.add(-MAX_SAFE_INTEGER).unwrap();
        assert_eq!(
            counter.add(-MAX_SAFE_INTEGER - 1).unwrap_err(),
            Error::OutOfExactRange
        );
        assert_eq!(
            counter
                .add_fractional(MAX_SAFE_INTEGER as f64 * 2.0)
                .unwrap_err(),
            Error::OutOfExactRange
        );
        assert_eq!(counter.value(), 0.0);
        counter.force_fractional(f64::INFINITY);
        assert_eq!(
            counter.add_fractional(1.0).unwrap_err(),
            Error::OutOfExactRange
        );
    }

    #[test]
    fn the_range_holds_for_the_whole_value() {
        let cells = record();
        let counter = Counter::new(&cells);
        assert!(counter.import_base((MAX_SAFE_INTEGER - 10) as f64));
        counter.add(10).unwrap();
        assert_eq!(counter.add(1).unwrap_err(), Error::OutOfExactRange);
        assert_eq!(
            counter.add_fractional(0.5).unwrap_err(),
            Error::OutOfExactRange
        );
        counter.add(-1).unwrap();
        counter.add_fractional(0.5).unwrap();
        assert_eq!(counter.add(1).unwrap_err(), Error::OutOfExactRange);
        assert_eq!(counter.value(), MAX_SAFE_INTEGER as f64 - 0.5);
    }

    #[test]
    fn the_mirror_remembers_what_was_written_zero_included() {
        let cells = record();
        let counter = Counter::new(&cells);
        counter.set_mirror(0.0);
        assert_eq!(counter.mirror(), Some(0.0));
        counter.set_mirror(-7.25);
        assert_eq!(counter.mirror(), Some(-7.25));
    }

    #[test]
    fn the_dict_hash_is_zlibs_crc32() {
        assert_eq!(dict_hash(b""), 0);
        assert_eq!(dict_hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            dict_hash(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn a_ticket_is_covered_by_a_sync_begun_after_it_once_it_finishes() {
        let word = AtomicU64::new(0);
        let progress = SyncProgress::new(&word);
        let first = progress.begin();
        let ticket = progress.ticket();
        assert!(!progress.covers(ticket));
        progress.finish(first);
        assert!(!progress.covers(ticket), "begun before the ticket");
        let second = progress.begin();
        assert_eq!(second, first + 1);
        assert!(!progress.covers(ticket), "not finished yet");
        progress.finish(second);
        assert!(progress.covers(ticket));
        assert!(!progress.covers(progress.ticket()));
    }

    #[test]
    fn sync_numbers_wrap() {
        let word = AtomicU64::new((u64::from(u32::MAX) << 32) | u64::from(u32::MAX));
        let progress = SyncProgress::new(&word);
        let ticket = progress.ticket();
        assert_eq!(ticket, u32::MAX);
        let number = progress.begin();
        assert_eq!(number, 0);
        assert!(!progress.covers(ticket));
        progress.finish(number);
        assert!(progress.covers(ticket));
        // A sync that died after it began (never finished) covers nothing.
        let ticket = progress.ticket();
        progress.begin();
        assert!(!progress.covers(ticket));
    }
}
