//! The engine's key table: keys to records of cells, in one region of
//! 64-bit words that every worker maps. Lookups and inserts are lock-free;
//! records are appended to an arena and never move, so a worker may keep a
//! pointer to a record's cells for its whole life.
//!
//! Layout (in words; docs/engine.md explains each part):
//!
//! ```text
//! 0..9      header: magic (2), version, size, index slots, seed (2),
//!           tag, checksum
//! 16..24    state: arena top, records, refused, wasted words
//! 24..64    lock words, one per cache line (LOCKS of them)
//! 64..      index: 0, or (hash >> 32) << 32 | record offset
//! then      arena: hash | key length, width << 32 | key bytes | cells
//! ```

use std::hash::Hasher;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use siphasher::sip::SipHasher13;

use super::word::Word;
use super::Error;

/// "resty-counter-rs" as two little-endian words.
pub const MAGIC: [u64; 2] = [
    u64::from_le_bytes(*b"resty-co"),
    u64::from_le_bytes(*b"unter-rs"),
];

/// Bumped whenever the layout changes: a region of another version is not
/// attached to (a reload that brings a new library with an old zone gets a
/// clear error instead of a misread region).
pub const VERSION: u64 = 1;

/// The longest key (a shared dict's own limit).
pub const MAX_KEY_LEN: usize = 65535;

/// The widest record, in cells.
pub const MAX_WIDTH: u32 = 1 << 16;

/// How many lock words the region offers (see [`Table::lock_word`]).
pub const LOCKS: usize = 5;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 2;
const H_WORDS: usize = 3;
const H_SLOTS: usize = 4;
const H_SEED: usize = 5;
const H_TAG: usize = 7;
const H_CHECKSUM: usize = 8;

const S_ARENA_TOP: usize = 16;
const S_RECORDS: usize = 17;
const S_REFUSED: usize = 18;
const S_WASTED: usize = 19;

/// Lock words sit 8 words (a cache line) apart, from word 24.
const LOCK_BASE: usize = 24;

const INDEX_START: usize = 64;
const MIN_SLOTS: usize = 16;

/// The smallest region [`Table::init`] accepts, in words.
pub const MIN_WORDS: usize = INDEX_START + MIN_SLOTS + 8 * MIN_SLOTS;

/// Words per index slot in the sizing rule: an average counter record
/// (hash, length, a 40-byte key, three cells) takes 10 words, and the
/// index is kept at most three quarters full.
const WORDS_PER_SLOT: usize = 8;

/// Figures for self-metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Records published (a worker killed mid-insert may leave this one
    /// above the records actually visible).
    pub records: u64,
    /// Most records the index takes.
    pub max_records: u64,
    /// Keys refused because the table was full.
    pub refused: u64,
    /// Arena words used, wasted ones included.
    pub arena_used: u64,
    /// Arena words in all.
    pub arena_total: u64,
    /// Arena words of records that lost an insert race.
    pub wasted: u64,
}

/// One key's record: its key and its cells.
#[derive(Debug)]
pub struct Record<'a, W: Word> {
    words: &'a [W],
    offset: usize,
    key_len: usize,
    width: usize,
}

impl<'a, W: Word> Record<'a, W> {
    /// The record's cells, zero when it was made.
    pub fn cells(&self) -> &'a [W] {
        let start = self.offset + 2 + key_words(self.key_len);
        &self.words[start..start + self.width]
    }

    /// Where the record starts in the region, in words (stable for the
    /// region's life).
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn width(&self) -> u32 {
        self.width as u32
    }

    pub fn key_len(&self) -> usize {
        self.key_len
    }

    /// Appends the record's key to `out`.
    pub fn key_into(&self, out: &mut Vec<u8>) {
        let words = &self.words[self.offset + 2..self.offset + 2 + key_words(self.key_len)];
        let mut left = self.key_len;
        for word in words {
            let bytes = word.load(Relaxed).to_le_bytes();
            let take = left.min(8);
            out.extend_from_slice(&bytes[..take]);
            left -= take;
        }
    }

    fn has_key(&self, hash: u64, key: &[u8]) -> bool {
        if self.words[self.offset].load(Relaxed) != hash || self.key_len != key.len() {
            return false;
        }
        let base = self.offset + 2;
        key.chunks(8)
            .enumerate()
            .all(|(i, chunk)| self.words[base + i].load(Relaxed) == pack(chunk))
    }
}

// Keys are stored as little-endian words so that their bytes lie in order
// in memory, where `Record::key_bytes` reads them without a copy.
#[cfg(target_endian = "big")]
compile_error!("the engine's key layout assumes a little-endian machine");

impl<'a> Record<'a, std::sync::atomic::AtomicU64> {
    /// The key's bytes, in place in the region (valid as long as it is).
    pub fn key_bytes(&self) -> &'a [u8] {
        let first = &self.words[self.offset + 2] as *const std::sync::atomic::AtomicU64;
        // The key's words were written before the record was published and
        // never change after: reading them as bytes races with nothing.
        unsafe { std::slice::from_raw_parts(first as *const u8, self.key_len) }
    }
}

/// A key table over a region of words.
#[derive(Debug)]
pub struct Table<'a, W: Word> {
    words: &'a [W],
    mask: usize,
    arena_start: usize,
    max_records: u64,
    seed: [u64; 2],
}

fn key_words(key_len: usize) -> usize {
    (key_len + 7) / 8
}

/// Up to 8 bytes as a little-endian word, zero-padded.
fn pack(chunk: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(bytes)
}

fn checksum(header: &[u64]) -> u64 {
    header.iter().fold(0x243F_6A88_85A3_08D3u64, |sum, &word| {
        (sum.rotate_left(13) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

/// The index slots for a region of `words` words: the power of two nearest
/// above WORDS_PER_SLOT arena words per slot, within a quarter of the
/// region.
fn slots_for(words: usize) -> usize {
    let budget = (words - INDEX_START) / (1 + WORDS_PER_SLOT);
    let mut slots = MIN_SLOTS;
    while slots < budget && slots * 2 <= (words - INDEX_START) / 4 {
        slots *= 2;
    }
    slots
}

impl<'a, W: Word> Table<'a, W> {
    /// Lays a new, empty table over `words`, which nobody else may touch
    /// until this returns. `seed` keys the hash (make it random: keys
    /// come from clients); `tag` is the caller's, checked by [`attach`].
    ///
    /// # Errors
    ///
    /// `RegionTooSmall` below [`MIN_WORDS`]; `RegionTooLarge` past 2^32
    /// words (record offsets are 32 bits).
    ///
    /// [`attach`]: Table::attach
    pub fn init(words: &'a [W], seed: [u64; 2], tag: u64) -> Result<Table<'a, W>, Error> {
        if words.len() < MIN_WORDS {
            return Err(Error::RegionTooSmall);
        }
        if words.len() > u32::MAX as usize {
            return Err(Error::RegionTooLarge);
        }
        for word in words {
            word.store(0, Relaxed);
        }

        let slots = slots_for(words.len());
        let mut header = [0u64; H_CHECKSUM];
        header[H_MAGIC] = MAGIC[0];
        header[H_MAGIC + 1] = MAGIC[1];
        header[H_VERSION] = VERSION;
        header[H_WORDS] = words.len() as u64;
        header[H_SLOTS] = slots as u64;
        header[H_SEED] = seed[0];
        header[H_SEED + 1] = seed[1];
        header[H_TAG] = tag;
        words[S_ARENA_TOP].store((INDEX_START + slots) as u64, Relaxed);
        // The magic goes last: a region is recognised only once complete.
        for (i, &value) in header.iter().enumerate().skip(H_VERSION) {
            words[i].store(value, Relaxed);
        }
        words[H_CHECKSUM].store(checksum(&header), Relaxed);
        words[H_MAGIC + 1].store(MAGIC[1], Release);
        words[H_MAGIC].store(MAGIC[0], Release);

        Table::attach(words, tag)
    }

    /// Whether `words` starts with the magic (a cheap first look).
    pub fn has_magic(words: &[W]) -> bool {
        words.len() >= MIN_WORDS
            && words[H_MAGIC].load(Acquire) == MAGIC[0]
            && words[H_MAGIC + 1].load(Acquire) == MAGIC[1]
    }

    /// The table laid over `words` by [`init`](Table::init), here or in
    /// another process.
    ///
    /// # Errors
    ///
    /// `NotATable` when the header is not a valid table of exactly this
    /// size with this tag; `VersionMismatch` for another layout version.
    pub fn attach(words: &'a [W], tag: u64) -> Result<Table<'a, W>, Error> {
        if !Table::has_magic(words) {
            return Err(Error::NotATable);
        }
        let mut header = [0u64; H_CHECKSUM];
        for (i, value) in header.iter_mut().enumerate() {
            *value = words[i].load(Acquire);
        }
        if words[H_CHECKSUM].load(Acquire) != checksum(&header) {
            return Err(Error::NotATable);
        }
        if header[H_VERSION] != VERSION {
            return Err(Error::VersionMismatch {
                found: header[H_VERSION],
            });
        }
        let slots = header[H_SLOTS] as usize;
        if header[H_WORDS] != words.len() as u64
            || header[H_TAG] != tag
            || slots != slots_for(words.len())
        {
            return Err(Error::NotATable);
        }
        Ok(Table {
            words,
            mask: slots - 1,
            arena_start: INDEX_START + slots,
            max_records: (slots - slots / 4) as u64,
            seed: [header[H_SEED], header[H_SEED + 1]],
        })
    }

    /// The hash of a key under this table's seed.
    pub fn hash(&self, key: &[u8]) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.seed[0], self.seed[1]);
        hasher.write(key);
        hasher.finish()
    }

    fn record_at(&self, offset: usize) -> Record<'a, W> {
        let lengths = self.words[offset + 1].load(Relaxed);
        Record {
            words: self.words,
            offset,
            key_len: (lengths & 0xFFFF_FFFF) as usize,
            width: (lengths >> 32) as usize,
        }
    }

    /// The record published at `offset` (as [`Record::offset`] gave it), for
    /// callers that keep offsets rather than records.
    ///
    /// # Errors
    ///
    /// `BadOffset` when no published record starts there.
    pub fn record(&self, offset: usize) -> Result<Record<'a, W>, Error> {
        if offset < self.arena_start || offset + 2 > self.words.len() {
            return Err(Error::BadOffset);
        }
        let hash = self.words[offset].load(Relaxed);
        let tag = hash >> 32;
        let mut slot = hash as usize & self.mask;
        for _ in 0..=self.mask {
            let entry = self.slot_entry(slot);
            if entry == 0 {
                break;
            }
            if entry == (tag << 32) | offset as u64 {
                return Ok(self.record_at(offset));
            }
            slot = (slot + 1) & self.mask;
        }
        Err(Error::BadOffset)
    }

    fn slot_entry(&self, slot: usize) -> u64 {
        self.words[INDEX_START + slot].load(Acquire)
    }

    /// The record whose entry is `entry`, if it holds `key`.
    fn matching(&self, entry: u64, hash: u64, key: &[u8]) -> Option<Record<'a, W>> {
        if entry >> 32 != hash >> 32 {
            return None;
        }
        let record = self.record_at((entry & 0xFFFF_FFFF) as usize);
        if record.has_key(hash, key) {
            Some(record)
        } else {
            None
        }
    }

    /// Where `key`'s probe ends: its record, or the first empty slot.
    fn probe(&self, hash: u64, key: &[u8]) -> Result<Record<'a, W>, Option<usize>> {
        let mut slot = hash as usize & self.mask;
        for _ in 0..=self.mask {
            let entry = self.slot_entry(slot);
            if entry == 0 {
                return Err(Some(slot));
            }
            if let Some(record) = self.matching(entry, hash, key) {
                return Ok(record);
            }
            slot = (slot + 1) & self.mask;
        }
        Err(None)
    }

    /// The record of `key`, if it has one.
    pub fn lookup(&self, key: &[u8]) -> Option<Record<'a, W>> {
        self.probe(self.hash(key), key).ok()
    }

    fn release_budget(&self) {
        self.words[S_RECORDS].fetch_add(u64::MAX, Relaxed);
    }

    fn refuse(&self) -> Error {
        self.words[S_REFUSED].fetch_add(1, Relaxed);
        Error::Full
    }

    /// The record of `key`, made with `width` zeroed cells if it has none;
    /// the flag says whether this call made it.
    ///
    /// # Errors
    ///
    /// `KeyTooLong` past [`MAX_KEY_LEN`]; `BadWidth` for 0 or past
    /// [`MAX_WIDTH`]; `WidthMismatch` when the key's record has another
    /// width (another kind of record has the key); `Full` when the index or
    /// the arena has no room (counted in [`Stats::refused`]).
    pub fn get_or_insert(&self, key: &[u8], width: u32) -> Result<(Record<'a, W>, bool), Error> {
        if key.len() > MAX_KEY_LEN {
            return Err(Error::KeyTooLong);
        }
        if width == 0 || width > MAX_WIDTH {
            return Err(Error::BadWidth);
        }
        let with_width = |record: Record<'a, W>, made: bool| {
            if record.width == width as usize {
                Ok((record, made))
            } else {
                Err(Error::WidthMismatch {
                    found: record.width as u32,
                })
            }
        };

        let hash = self.hash(key);
        let mut slot = match self.probe(hash, key) {
            Ok(record) => return with_width(record, false),
            Err(Some(slot)) => slot,
            Err(None) => return Err(self.refuse()),
        };

        // A place in the record budget keeps the index at most three
        // quarters full, so probes stay short and always end.
        if self.words[S_RECORDS].fetch_add(1, Relaxed) >= self.max_records {
            self.release_budget();
            return Err(self.refuse());
        }
        let size = 2 + key_words(key.len()) + width as usize;
        let offset = self.words[S_ARENA_TOP].fetch_add(size as u64, Relaxed) as usize;
        if offset + size > self.words.len() {
            // The arena top stays past the end: every later insert is
            // refused here too, which is what full means.
            self.release_budget();
            return Err(self.refuse());
        }

        // The record, complete before it is published. Its cells are zero:
        // the arena was zeroed by init and is never reused.
        self.words[offset].store(hash, Relaxed);
        self.words[offset + 1].store(key.len() as u64 | (u64::from(width) << 32), Relaxed);
        for (i, chunk) in key.chunks(8).enumerate() {
            self.words[offset + 2 + i].store(pack(chunk), Relaxed);
        }
        let entry = ((hash >> 32) << 32) | offset as u64;

        for _ in 0..=self.mask {
            match self.words[INDEX_START + slot].compare_exchange(0, entry, Release, Acquire) {
                Ok(_) => return with_width(self.record_at(offset), true),
                Err(other) => {
                    if let Some(record) = self.matching(other, hash, key) {
                        // Another worker made the same key first.
                        self.words[S_WASTED].fetch_add(size as u64, Relaxed);
                        self.release_budget();
                        return with_width(record, false);
                    }
                }
            }
            slot = (slot + 1) & self.mask;
        }
        self.words[S_WASTED].fetch_add(size as u64, Relaxed);
        self.release_budget();
        Err(self.refuse())
    }

    /// Every published record, in index order.
    pub fn records(&self) -> impl Iterator<Item = Record<'a, W>> + '_ {
        (0..=self.mask).filter_map(move |slot| {
            let entry = self.slot_entry(slot);
            if entry == 0 {
                None
            } else {
                Some(self.record_at((entry & 0xFFFF_FFFF) as usize))
            }
        })
    }

    /// Every published record, in the order they were made: one pass over
    /// the index collects their offsets into `offsets`, then the records are
    /// read in address order, which the hardware prefetches. In index
    /// (hash) order, as [`Table::records`] gives them, each is a cache miss:
    /// most of a sync's time on a large table.
    pub fn records_in_arena_order<'s>(
        &'s self,
        offsets: &'s mut Vec<u32>,
    ) -> impl Iterator<Item = Record<'a, W>> + 's {
        self.offsets_in_arena_order(offsets);
        offsets
            .iter()
            .map(move |&offset| self.record_at(offset as usize))
    }

    /// The offsets of every record published now, in the order they were
    /// made, into `offsets`: for a walk in several steps, each reading
    /// some with [`Table::record_in_arena`] (records are never removed).
    pub fn offsets_in_arena_order(&self, offsets: &mut Vec<u32>) {
        offsets.clear();
        self.offsets_in_slots(0..self.index_slots(), offsets);
        offsets.sort_unstable();
    }

    /// How many slots the index has: its size, not its records'.
    pub fn index_slots(&self) -> usize {
        self.mask + 1
    }

    /// Appends the offsets of the records published in index slots
    /// `slots` (within [`Table::index_slots`]) to `offsets`, in index
    /// order: a scan of a large index in several steps.
    pub fn offsets_in_slots(&self, slots: std::ops::Range<usize>, offsets: &mut Vec<u32>) {
        // The range's words as one slice: no bounds check per slot (an
        // index of millions of slots is read at every scrape).
        let index = &self.words[INDEX_START + slots.start..INDEX_START + slots.end];
        for slot in index {
            let entry = slot.load(Acquire);
            if entry != 0 {
                offsets.push(entry as u32);
            }
        }
    }

    /// The record at `offset`, one that [`Table::offsets_in_arena_order`]
    /// gave for this table (anything else reads garbage or panics).
    pub fn record_in_arena(&self, offset: u32) -> Record<'a, W> {
        self.record_at(offset as usize)
    }

    /// Lock word `i` (below [`LOCKS`]), each on its own cache line, zero
    /// when the region was made. See [`super::lock`].
    pub fn lock_word(&self, i: usize) -> &'a W {
        assert!(i < LOCKS, "lock word {} of {}", i, LOCKS);
        &self.words[LOCK_BASE + 8 * i]
    }

    pub fn stats(&self) -> Stats {
        let arena_total = (self.words.len() - self.arena_start) as u64;
        let top = self.words[S_ARENA_TOP].load(Relaxed);
        Stats {
            records: self.words[S_RECORDS].load(Relaxed).min(self.max_records),
            max_records: self.max_records,
            refused: self.words[S_REFUSED].load(Relaxed),
            arena_used: (top - self.arena_start as u64).min(arena_total),
            arena_total,
            wasted: self.words[S_WASTED].load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;

    fn region(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0xDEAD_BEEF)).collect()
    }

    #[test]
    fn init_then_attach_sees_the_same_table() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 77).unwrap();
        let (record, made) = table.get_or_insert(b"hello", 3).unwrap();
        assert!(made);
        record.cells()[1].store(42, Relaxed);

        let again = Table::attach(&words, 77).unwrap();
        let found = again.lookup(b"hello").unwrap();
        assert_eq!(found.offset(), record.offset());
        assert_eq!(found.cells()[1].load(Relaxed), 42);
        assert_eq!(found.width(), 3);
        let mut key = Vec::new();
        found.key_into(&mut key);
        assert_eq!(key, b"hello");
    }

    #[test]
    fn attach_refuses_what_is_not_a_table() {
        let words = region(4096);
        assert_eq!(Table::attach(&words, 0).unwrap_err(), Error::NotATable);

        Table::init(&words, [1, 2], 5).unwrap();
        // Another tag (another offset in the pool), another size.
        assert_eq!(Table::attach(&words, 6).unwrap_err(), Error::NotATable);
        assert_eq!(
            Table::attach(&words[..4000], 5).unwrap_err(),
            Error::NotATable
        );

        // One flipped header bit fails the checksum.
        words[H_SLOTS].fetch_add(1, Relaxed);
        assert_eq!(Table::attach(&words, 5).unwrap_err(), Error::NotATable);
        words[H_SLOTS].fetch_add(u64::MAX, Relaxed);
        assert!(Table::attach(&words, 5).is_ok());

        // A region of another layout version is named as such.
        let mut header = [0u64; H_CHECKSUM];
        words[H_VERSION].store(VERSION + 1, Relaxed);
        for (i, value) in header.iter_mut().enumerate() {
            *value = words[i].load(Relaxed);
        }
        words[H_CHECKSUM].store(checksum(&header), Relaxed);
        assert_eq!(
            Table::attach(&words, 5).unwrap_err(),
            Error::VersionMismatch { found: VERSION + 1 }
        );
    }

    #[test]
    fn init_refuses_regions_too_small() {
        let words = region(MIN_WORDS - 1);
        assert_eq!(
            Table::init(&words, [0, 0], 0).unwrap_err(),
            Error::RegionTooSmall
        );
        let words = region(MIN_WORDS);
        assert!(Table::init(&words, [0, 0], 0).is_ok());
    }

    #[test]
    fn keys_of_every_length_are_kept_apart() {
        let words = region(1 << 16);
        let table = Table::init(&words, [3, 4], 0).unwrap();
        let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..40 {
            keys.push(vec![b'k'; len]);
            let mut other = vec![b'k'; len];
            other[len - 1] = 0;
            keys.push(other);
        }
        for (i, key) in keys.iter().enumerate() {
            let (record, made) = table.get_or_insert(key, 1).unwrap();
            assert!(made, "key {:?}", key);
            record.cells()[0].store(i as u64, Relaxed);
        }
        for (i, key) in keys.iter().enumerate() {
            let record = table.lookup(key).unwrap();
            assert_eq!(record.cells()[0].load(Relaxed), i as u64);
            let (again, made) = table.get_or_insert(key, 1).unwrap();
            assert!(!made);
            assert_eq!(again.offset(), record.offset());
        }
        assert!(table.lookup(b"absent").is_none());
        assert_eq!(table.records().count(), keys.len());

        // The same records in the order they were made.
        let mut offsets = Vec::new();
        let in_order: Vec<usize> = table
            .records_in_arena_order(&mut offsets)
            .map(|record| record.cells()[0].load(Relaxed) as usize)
            .collect();
        assert_eq!(in_order, (0..keys.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_key_keeps_its_width() {
        let words = region(4096);
        let table = Table::init(&words, [0, 1], 0).unwrap();
        table.get_or_insert(b"k", 2).unwrap();
        assert_eq!(
            table.get_or_insert(b"k", 3).unwrap_err(),
            Error::WidthMismatch { found: 2 }
        );
        assert_eq!(table.get_or_insert(b"j", 0).unwrap_err(), Error::BadWidth);
        let long = vec![b'x'; MAX_KEY_LEN + 1];
        assert_eq!(
            table.get_or_insert(&long, 1).unwrap_err(),
            Error::KeyTooLong
        );
    }

    #[test]
    fn a_full_table_refuses_new_keys_and_keeps_the_old() {
        let words = region(MIN_WORDS * 4);
        let table = Table::init(&words, [9, 9], 0).unwrap();
        let mut kept = HashMap::new();
        let mut refused = 0;
        for i in 0..10_000u64 {
            let key = format!("key-{}", i);
            match table.get_or_insert(key.as_bytes(), 2) {
                Ok((record, _)) => {
                    record.cells()[0].store(i, Relaxed);
                    kept.insert(key, i);
                }
                Err(Error::Full) => refused += 1,
                Err(e) => panic!("{}", e),
            }
        }
        assert!(refused > 0 && !kept.is_empty());
        let stats = table.stats();
        assert_eq!(stats.refused, refused);
        assert_eq!(stats.records, kept.len() as u64);
        assert!(stats.records <= stats.max_records);
        for (key, value) in &kept {
            let record = table.lookup(key.as_bytes()).unwrap();
            assert_eq!(record.cells()[0].load(Relaxed), *value);
        }
    }

    #[test]
    fn record_by_offset_finds_only_published_records() {
        let words = region(4096);
        let table = Table::init(&words, [5, 6], 0).unwrap();
        let (record, _) = table.get_or_insert(b"abc", 2).unwrap();
        assert_eq!(table.record(record.offset()).unwrap().width(), 2);
        assert_eq!(
            table.record(record.offset() + 1).unwrap_err(),
            Error::BadOffset
        );
        assert_eq!(table.record(3).unwrap_err(), Error::BadOffset);
        assert_eq!(table.record(1 << 40).unwrap_err(), Error::BadOffset);
    }

    #[test]
    fn seeds_change_where_keys_land() {
        let a = region(4096);
        let b = region(4096);
        let ta = Table::init(&a, [1, 1], 0).unwrap();
        let tb = Table::init(&b, [2, 2], 0).unwrap();
        assert_ne!(ta.hash(b"same key"), tb.hash(b"same key"));
    }
}
