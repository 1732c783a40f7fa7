//! The engine's key table: keys to records of cells, in one region of
//! 64-bit words that every worker maps. Lookups are lock-free; new keys and
//! removals take the table lock (a pid lock, taken over from a dead
//! holder). Records never move: a worker may keep a pointer to a record's
//! cells, and checks the table's epoch (bumped by every removal) before it
//! writes through it. A removed record's space is reused for a record of
//! the same size, no sooner than [`GRACE_SECONDS`] after its removal.
//!
//! Layout (in words; docs/engine.md explains each part):
//!
//! ```text
//! 0..9      header: magic (2), version, size, index slots, seed (2),
//!           tag, checksum
//! 16..24    state: arena top, records, refused, wasted words,
//!           tombstones, removed, reused, free records
//! 24..64    lock words, one per cache line (LOCKS of them)
//! 64        the table lock (own cache line)
//! 72        the epoch: removals so far (own cache line, read per request)
//! 80..82    free words, leaked words
//! 82..127   free lists: FREE_LISTS of (record size, head, tail)
//! 128..     index: 0 empty, 1 tombstone, or
//!           (hash >> 32) << 32 | record offset
//! then      arena: hash | key length, width << 32 | key bytes | cells
//!           (a free record: removal second << 32 | next free record |
//!           key length, width << 32 | ...)
//! ```

use std::hash::Hasher;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use siphasher::sip::SipHasher13;

use super::lock::{self, Holder, Taken};
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
pub const VERSION: u64 = 2;

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
const S_TOMBS: usize = 20;
const S_REMOVED: usize = 21;
const S_REUSED: usize = 22;
const S_FREE: usize = 23;

const TABLE_LOCK: usize = 64;
const EPOCH: usize = 72;
const F_FREE_WORDS: usize = 80;
const F_LEAKED: usize = 81;
const FREE_LIST_BASE: usize = 82;

/// How many sizes of removed records wait for reuse at once: a removed
/// record of another size, when every list holds records, is leaked
/// (counted in [`Stats::leaked`]).
pub const FREE_LISTS: usize = 15;

/// A removed record is reused no sooner than this many seconds after its
/// removal: a writer that checked the epoch just before the removal has
/// this long to finish its write (see docs/engine.md, "Removal").
pub const GRACE_SECONDS: u64 = 10;

/// An index slot whose record was removed: lookups go past it, new keys
/// may take it.
const TOMB: u64 = 1;

/// How many times a new key or a removal tries the table lock before it
/// gives up (`Busy`): a holder keeps it for microseconds; one still at it
/// after this many tries (with yields) is stopped or descheduled.
const LOCK_TRIES: u32 = 20_000;

/// Lock words sit 8 words (a cache line) apart, from word 24.
const LOCK_BASE: usize = 24;

const INDEX_START: usize = 128;
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
    /// Arena words of records that lost an insert race (none since new
    /// keys take the table lock; kept for the figures' users).
    pub wasted: u64,
    /// Index slots holding a tombstone (a removed record's).
    pub tombstones: u64,
    /// Records removed since the table was made.
    pub removed: u64,
    /// Records made in a removed record's space.
    pub reused: u64,
    /// Removed records waiting for reuse, and their words.
    pub free: u64,
    pub free_words: u64,
    /// Words of removed records that found no free list (every list held
    /// records of other sizes): never reused.
    pub leaked: u64,
}

/// Who takes the table lock, and the time: what new keys and removals
/// need.
pub trait Owner {
    /// This process (or thread) as a lock holder.
    fn me(&self) -> Holder;
    /// Whether a lock holder's process still exists.
    fn alive(&self, pid: u32) -> bool;
    /// Seconds on a clock every process shares (for the grace period).
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
    /// One wait for a held lock: a short spin, then yields of the CPU.
    fn pause(&self, tries: u32) {
        if tries < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The owner [`Table::get_or_insert`] and [`Table::remove`] use: nginx
/// sets its pid and `kill(pid, 0)` ([`Table::with_owner`]); by default each
/// thread is a holder of its own that is never taken for dead.
#[derive(Debug, Clone, Copy)]
pub struct Process {
    pub me: fn() -> Holder,
    pub alive: fn(u32) -> bool,
}

impl Owner for Process {
    fn me(&self) -> Holder {
        (self.me)()
    }

    fn alive(&self, pid: u32) -> bool {
        (self.alive)(pid)
    }
}

/// A holder per thread: pids from 2^31 (above any real pid), never dead.
fn thread_holder() -> Holder {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static ME: u32 = 0x8000_0000 | NEXT.fetch_add(1, Relaxed);
    }
    Holder {
        pid: ME.with(|me| *me),
        instance: 1,
    }
}

const THREADS: Process = Process {
    me: thread_holder,
    alive: |_| true,
};

/// Releases the table lock when dropped (a panic under it included).
struct Locked<'t, W: Word> {
    word: &'t W,
    me: Holder,
}

impl<W: Word> Drop for Locked<'_, W> {
    fn drop(&mut self) {
        lock::unlock(self.word, self.me);
    }
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
    owner: Process,
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
            owner: THREADS,
        })
    }

    /// The table with `owner` for [`Table::get_or_insert`] and
    /// [`Table::remove`] (nginx: its pid and `kill(pid, 0)`).
    pub fn with_owner(mut self, owner: Process) -> Table<'a, W> {
        self.owner = owner;
        self
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

    /// The epoch: how many records were removed so far. A worker that
    /// keeps records' cells loads it (Acquire) before it looks a key up,
    /// and again before each write through the cells it kept: a change
    /// means any of them may have been removed; it looks them up again.
    pub fn epoch(&self) -> u64 {
        self.words[EPOCH].load(Acquire)
    }

    /// The epoch's word, for callers that read it themselves (the Lua
    /// side, through a pointer to it).
    pub fn epoch_word(&self) -> &'a W {
        &self.words[EPOCH]
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
            if entry != TOMB {
                if let Some(record) = self.matching(entry, hash, key) {
                    return Ok(record);
                }
            }
            slot = (slot + 1) & self.mask;
        }
        Err(None)
    }

    /// The record of `key`, if it has one.
    pub fn lookup(&self, key: &[u8]) -> Option<Record<'a, W>> {
        self.probe(self.hash(key), key).ok()
    }

    fn refuse(&self) -> Error {
        self.words[S_REFUSED].fetch_add(1, Relaxed);
        Error::Full
    }

    /// Takes the table lock for `owner`, waiting while a live holder has
    /// it. A dead holder's lock is taken over: what it left half done is
    /// made whole first (see [`Table::recover`]).
    fn lock<'t>(&'t self, owner: &impl Owner) -> Result<Locked<'t, W>, Error> {
        let word = &self.words[TABLE_LOCK];
        let me = owner.me();
        for tries in 0..LOCK_TRIES {
            match lock::try_lock(word, me, |pid| owner.alive(pid)) {
                Ok(taken) => {
                    let locked = Locked { word, me };
                    if let Taken::FromDead(_) = taken {
                        self.recover();
                    }
                    return Ok(locked);
                }
                Err(_) => owner.pause(tries),
            }
        }
        Err(Error::Busy)
    }

    /// What a holder killed under the table lock may have left: a removal
    /// whose epoch was not bumped yet (bumped now: workers look their keys
    /// up again), a free list whose tail lags its last record (set to the
    /// last record the list reaches). At most the record the dead holder
    /// was handling is lost (not in the index, on no list).
    fn recover(&self) {
        self.words[EPOCH].fetch_add(1, Release);
        let limit = self.words.len();
        for list in 0..FREE_LISTS {
            let base = FREE_LIST_BASE + 3 * list;
            let mut at = self.words[base + 1].load(Relaxed) as usize;
            if at == 0 {
                self.words[base + 2].store(0, Relaxed);
                continue;
            }
            for _ in 0..limit {
                let next = self.words[at].load(Relaxed) as u32 as usize;
                if next == 0 {
                    break;
                }
                at = next;
            }
            self.words[base + 2].store(at as u64, Relaxed);
        }
    }

    /// The record of `key`, made with `width` zeroed cells if it has none;
    /// the flag says whether this call made it. A new key takes the table
    /// lock for this table's owner ([`Table::with_owner`]).
    ///
    /// # Errors
    ///
    /// `KeyTooLong` past [`MAX_KEY_LEN`]; `BadWidth` for 0 or past
    /// [`MAX_WIDTH`]; `WidthMismatch` when the key's record has another
    /// width (another kind of record has the key); `Full` when the index or
    /// the arena has no room (counted in [`Stats::refused`]); `Busy` when a
    /// live worker held the table lock all the while.
    pub fn get_or_insert(&self, key: &[u8], width: u32) -> Result<(Record<'a, W>, bool), Error> {
        let owner = self.owner;
        self.get_or_insert_by(key, width, &owner)
    }

    /// [`Table::get_or_insert`] with the lock taken for `owner`.
    ///
    /// # Errors
    ///
    /// As [`Table::get_or_insert`].
    pub fn get_or_insert_by(
        &self,
        key: &[u8],
        width: u32,
        owner: &impl Owner,
    ) -> Result<(Record<'a, W>, bool), Error> {
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
        if let Ok(record) = self.probe(hash, key) {
            return with_width(record, false);
        }

        // A new key: the index changes under the lock only, so the probe
        // below is the truth until we unlock.
        let _locked = self.lock(owner)?;
        let mut slot = hash as usize & self.mask;
        let mut target = None;
        for _ in 0..=self.mask {
            let entry = self.slot_entry(slot);
            if entry == 0 {
                target = target.or(Some(slot));
                break;
            }
            if entry == TOMB {
                target = target.or(Some(slot));
            } else if let Some(record) = self.matching(entry, hash, key) {
                // Made by another worker while we waited for the lock.
                return with_width(record, false);
            }
            slot = (slot + 1) & self.mask;
        }
        let target = match target {
            Some(target) => target,
            None => return Err(self.refuse()),
        };
        let into_tomb = self.slot_entry(target) == TOMB;

        // Live records stay below three quarters of the index, and so do
        // live records and tombstones together when a key takes an empty
        // slot: probes stay short and always end.
        let records = self.words[S_RECORDS].load(Relaxed);
        let tombs = self.words[S_TOMBS].load(Relaxed);
        if records >= self.max_records || (!into_tomb && records + tombs >= self.max_records) {
            return Err(self.refuse());
        }
        let size = 2 + key_words(key.len()) + width as usize;
        let (offset, reused) = match self.take_free(size, owner.now()) {
            Some(offset) => (offset, true),
            None => {
                let top = self.words[S_ARENA_TOP].load(Relaxed) as usize;
                if top + size > self.words.len() {
                    return Err(self.refuse());
                }
                self.words[S_ARENA_TOP].store((top + size) as u64, Relaxed);
                (top, false)
            }
        };

        // The record, complete before it is published (a reused one's
        // cells zeroed).
        self.words[offset].store(hash, Relaxed);
        self.words[offset + 1].store(key.len() as u64 | (u64::from(width) << 32), Relaxed);
        for (i, chunk) in key.chunks(8).enumerate() {
            self.words[offset + 2 + i].store(pack(chunk), Relaxed);
        }
        if reused {
            for cell in &self.words[offset + 2 + key_words(key.len())..offset + size] {
                cell.store(0, Relaxed);
            }
        }
        let entry = ((hash >> 32) << 32) | offset as u64;
        self.words[INDEX_START + target].store(entry, Release);
        // Release: whoever reads the new count reads the entry too
        // ([`Table::records_mark`]).
        self.words[S_RECORDS].fetch_add(1, Release);
        if into_tomb {
            self.words[S_TOMBS].fetch_add(u64::MAX, Relaxed);
        }
        if reused {
            self.words[S_REUSED].fetch_add(1, Relaxed);
        }
        with_width(self.record_at(offset), true)
    }

    /// Removes `key`'s record if it has one and `remove(record)` says so
    /// (asked under the table lock, so no other worker removes or makes
    /// the key meanwhile): true when removed. The epoch moves on; the
    /// record's space is reused for a record of its size no sooner than
    /// [`GRACE_SECONDS`] later.
    ///
    /// # Errors
    ///
    /// `KeyTooLong`; `Busy` when a live worker held the table lock all the
    /// while.
    pub fn remove_if(
        &self,
        key: &[u8],
        owner: &impl Owner,
        remove: impl FnOnce(&Record<'a, W>) -> bool,
    ) -> Result<bool, Error> {
        if key.len() > MAX_KEY_LEN {
            return Err(Error::KeyTooLong);
        }
        let hash = self.hash(key);
        if self.probe(hash, key).is_err() {
            return Ok(false);
        }
        let _locked = self.lock(owner)?;
        let mut slot = hash as usize & self.mask;
        for _ in 0..=self.mask {
            let entry = self.slot_entry(slot);
            if entry == 0 {
                return Ok(false);
            }
            if entry != TOMB {
                if let Some(record) = self.matching(entry, hash, key) {
                    if !remove(&record) {
                        return Ok(false);
                    }
                    self.unpublish(slot);
                    self.free(&record, owner.now());
                    return Ok(true);
                }
            }
            slot = (slot + 1) & self.mask;
        }
        Ok(false)
    }

    /// [`Table::remove_if`] of `key`, whatever its record holds, by this
    /// table's owner.
    ///
    /// # Errors
    ///
    /// As [`Table::remove_if`].
    pub fn remove(&self, key: &[u8]) -> Result<bool, Error> {
        let owner = self.owner;
        self.remove_if(key, &owner, |_| true)
    }

    /// Takes the record out of index slot `slot` (under the lock): a
    /// tombstone, or empty when it ends its run (and so do the tombstones
    /// before it), then the epoch moves on.
    fn unpublish(&self, slot: usize) {
        let next = (slot + 1) & self.mask;
        if self.slot_entry(next) == 0 {
            // The run's tail: no key lies past it, so empty is what a
            // lookup may find here. Tombstones before it are tails now.
            self.words[INDEX_START + slot].store(0, Release);
            let mut before = slot;
            for _ in 0..self.mask {
                before = before.wrapping_sub(1) & self.mask;
                if self.slot_entry(before) != TOMB {
                    break;
                }
                self.words[INDEX_START + before].store(0, Release);
                self.words[S_TOMBS].fetch_add(u64::MAX, Relaxed);
            }
        } else {
            self.words[INDEX_START + slot].store(TOMB, Release);
            self.words[S_TOMBS].fetch_add(1, Relaxed);
        }
        // After the slot: a worker that sees the new epoch sees the key
        // gone.
        self.words[EPOCH].fetch_add(1, Release);
        self.words[S_RECORDS].fetch_add(u64::MAX, Relaxed);
        self.words[S_REMOVED].fetch_add(1, Relaxed);
    }

    /// Puts a removed record at the tail of the free list of its size
    /// (under the lock), stamped with `now`; leaked when no list has room
    /// for its size.
    fn free(&self, record: &Record<'a, W>, now: u64) {
        let size = 2 + key_words(record.key_len) + record.width;
        let mut list = None;
        for i in 0..FREE_LISTS {
            let base = FREE_LIST_BASE + 3 * i;
            let listed = self.words[base].load(Relaxed) as usize;
            if listed == size {
                list = Some(base);
                break;
            }
            if list.is_none() && self.words[base + 1].load(Relaxed) == 0 {
                list = Some(base);
            }
        }
        let base = match list {
            Some(base) => base,
            None => {
                self.words[F_LEAKED].fetch_add(size as u64, Relaxed);
                return;
            }
        };
        let offset = record.offset;
        let stamp = (now.min(u64::from(u32::MAX))) << 32;
        // Each step leaves a list its next holder can use (a killed holder
        // lets the taker-over mend the tail, see recover()).
        self.words[offset].store(stamp, Relaxed);
        if self.words[base + 1].load(Relaxed) == 0 {
            self.words[base].store(size as u64, Relaxed);
            self.words[base + 2].store(offset as u64, Relaxed);
            self.words[base + 1].store(offset as u64, Relaxed);
        } else {
            let tail = self.words[base + 2].load(Relaxed) as usize;
            let linked = (self.words[tail].load(Relaxed) & !0xFFFF_FFFF) | offset as u64;
            self.words[tail].store(linked, Relaxed);
            self.words[base + 2].store(offset as u64, Relaxed);
        }
        self.words[S_FREE].fetch_add(1, Relaxed);
        self.words[F_FREE_WORDS].fetch_add(size as u64, Relaxed);
    }

    /// The oldest removed record of `size` words if it was removed at
    /// least [`GRACE_SECONDS`] before `now` (under the lock).
    fn take_free(&self, size: usize, now: u64) -> Option<usize> {
        let base = (0..FREE_LISTS)
            .map(|i| FREE_LIST_BASE + 3 * i)
            .find(|&base| self.words[base].load(Relaxed) as usize == size)?;
        let head = self.words[base + 1].load(Relaxed) as usize;
        if head == 0 {
            return None;
        }
        let word = self.words[head].load(Relaxed);
        if (word >> 32) + GRACE_SECONDS > now {
            return None;
        }
        let next = word as u32 as u64;
        if next == 0 {
            // The tail first: a list whose head is set is never read
            // through a stale tail (recover() mends a head left).
            self.words[base + 2].store(0, Relaxed);
            self.words[base + 1].store(0, Relaxed);
        } else {
            self.words[base + 1].store(next, Relaxed);
        }
        self.words[S_FREE].fetch_add(u64::MAX, Relaxed);
        self.words[F_FREE_WORDS].fetch_add((size as u64).wrapping_neg(), Relaxed);
        Some(head)
    }

    /// Every published record, in index order.
    pub fn records(&self) -> impl Iterator<Item = Record<'a, W>> + '_ {
        (0..=self.mask).filter_map(move |slot| {
            let entry = self.slot_entry(slot);
            if entry == 0 || entry == TOMB {
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
    /// some with [`Table::record_in_arena`] (a record removed meanwhile is
    /// still readable: its space is not reused for [`GRACE_SECONDS`]).
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
            if entry != 0 && entry != TOMB {
                offsets.push(entry as u32);
            }
        }
    }

    /// A mark of the set of published records, for a caller that keeps a
    /// list of them from a scan of the index ([`Table::offsets_in_slots`])
    /// and scans again only when it changed: take a mark before the scan;
    /// while a later mark is equal to it, no record was published or
    /// removed since (every publication counts a record, every removal
    /// moves the epoch on, each under the table lock). None while the table
    /// lock is held, by a live worker or a dead one (killed between
    /// publishing a record and counting it): scan then.
    pub fn records_mark(&self) -> Option<[u64; 2]> {
        // Acquire: the critical sections done before the lock was last
        // released are seen whole; a count or epoch seen from a later one
        // (Release) brings its index writes with it.
        if self.words[TABLE_LOCK].load(Acquire) != 0 {
            return None;
        }
        Some([
            self.words[EPOCH].load(Acquire),
            self.words[S_RECORDS].load(Acquire),
        ])
    }

    /// The record at `offset`, one that [`Table::offsets_in_arena_order`]
    /// gave for this table (anything else reads garbage or panics).
    pub fn record_in_arena(&self, offset: u32) -> Record<'a, W> {
        self.record_at(offset as usize)
    }

    /// Asks for the first cache line of the record at `offset` (its hash,
    /// lengths and key's start) ahead of [`Table::record_in_arena`]: see
    /// [`super::word::prefetch`]. Nothing for an offset past the region.
    pub fn prefetch_record(&self, offset: u32) {
        if let Some(word) = self.words.get(offset as usize) {
            super::word::prefetch(word);
        }
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
            tombstones: self.words[S_TOMBS].load(Relaxed),
            removed: self.words[S_REMOVED].load(Relaxed),
            reused: self.words[S_REUSED].load(Relaxed),
            free: self.words[S_FREE].load(Relaxed),
            free_words: self.words[F_FREE_WORDS].load(Relaxed),
            leaked: self.words[F_LEAKED].load(Relaxed),
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

    /// A process `pid` that takes `dead` for dead, on a clock the test
    /// moves.
    struct At {
        pid: u32,
        dead: u32,
        clock: std::sync::atomic::AtomicU64,
    }

    impl Owner for At {
        fn me(&self) -> Holder {
            Holder {
                pid: self.pid,
                instance: 1,
            }
        }

        fn alive(&self, pid: u32) -> bool {
            pid != self.dead
        }

        fn now(&self) -> u64 {
            self.clock.load(Relaxed)
        }
    }

    fn at(now: u64) -> At {
        At {
            pid: 1,
            dead: 0,
            clock: std::sync::atomic::AtomicU64::new(now),
        }
    }

    #[test]
    fn the_records_mark_moves_with_each_new_record_and_removal() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let empty = table.records_mark().unwrap();
        table.get_or_insert(b"a", 4).unwrap();
        let one = table.records_mark().unwrap();
        assert_ne!(one, empty, "a new record");
        table.get_or_insert(b"a", 4).unwrap();
        assert_eq!(table.records_mark().unwrap(), one, "no new record");
        table.get_or_insert(b"b", 4).unwrap();
        assert!(table.remove(b"a").unwrap());
        let removed = table.records_mark().unwrap();
        assert_ne!(removed, one, "as many records, but another set");

        // A worker killed between publishing a record and counting it
        // leaves the count as it was, and the table lock held: no mark
        // (the caller scans) until a new holder takes the lock over, which
        // moves the epoch on.
        table.get_or_insert(b"c", 4).unwrap();
        words[S_RECORDS].fetch_sub(1, Relaxed);
        let dead = lock::Holder {
            pid: 0x7FFF_FFF0,
            instance: 1,
        };
        assert!(lock::try_lock(&words[TABLE_LOCK], dead, |_| true).is_ok());
        assert_eq!(table.records_mark(), None);
        table.get_or_insert_by(b"a", 4, &DeadAt(dead)).unwrap();
        let taken_over = table.records_mark().unwrap();
        assert_ne!(taken_over[0], removed[0], "the epoch");
    }

    /// An owner for whom `dead` is dead (its lock is taken over).
    struct DeadAt(lock::Holder);

    impl Owner for DeadAt {
        fn me(&self) -> lock::Holder {
            lock::Holder {
                pid: 0x7FFF_FFF1,
                instance: 1,
            }
        }

        fn alive(&self, pid: u32) -> bool {
            pid != self.0.pid
        }
    }

    #[test]
    fn a_removed_key_is_gone_and_the_epoch_moves_on() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let clock = at(1000);
        table.get_or_insert_by(b"a", 2, &clock).unwrap();
        table.get_or_insert_by(b"b", 2, &clock).unwrap();
        let epoch = table.epoch();
        assert!(!table.remove_if(b"a", &clock, |_| false).unwrap());
        assert_eq!(table.epoch(), epoch);
        assert!(table.remove_if(b"a", &clock, |_| true).unwrap());
        assert_eq!(table.epoch(), epoch + 1);
        assert!(table.lookup(b"a").is_none());
        assert!(table.lookup(b"b").is_some());
        assert!(!table.remove_if(b"a", &clock, |_| true).unwrap());
        assert_eq!(table.records().count(), 1);
        let stats = table.stats();
        assert_eq!((stats.records, stats.removed, stats.free), (1, 1, 1));
        assert_eq!(stats.free_words, 2 + 1 + 2);
    }

    #[test]
    fn a_removed_record_is_reused_only_after_the_grace_period() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let clock = at(1000);
        let (old, _) = table.get_or_insert_by(b"old-key", 3, &clock).unwrap();
        old.cells()[0].store(7, Relaxed);
        table.remove_if(b"old-key", &clock, |_| true).unwrap();

        // Within the grace period: a new record of the same size goes to
        // the arena's top.
        clock.clock.store(1000 + GRACE_SECONDS - 1, Relaxed);
        let (early, made) = table.get_or_insert_by(b"new-key", 3, &clock).unwrap();
        assert!(made);
        assert_ne!(early.offset(), old.offset());

        // After it: the removed record's space, cells zeroed.
        clock.clock.store(1000 + GRACE_SECONDS, Relaxed);
        let (late, made) = table.get_or_insert_by(b"key-new", 3, &clock).unwrap();
        assert!(made);
        assert_eq!(late.offset(), old.offset());
        assert_eq!(late.cells()[0].load(Relaxed), 0);
        let mut key = Vec::new();
        table.lookup(b"key-new").unwrap().key_into(&mut key);
        assert_eq!(key, b"key-new");
        let stats = table.stats();
        assert_eq!((stats.reused, stats.free, stats.free_words), (1, 0, 0));

        // Another size does not take it.
        table.remove_if(b"key-new", &clock, |_| true).unwrap();
        clock.clock.store(2000, Relaxed);
        let (other, _) = table.get_or_insert_by(b"key-new", 4, &clock).unwrap();
        assert_ne!(other.offset(), old.offset());
    }

    #[test]
    fn tombstones_keep_runs_whole_and_are_taken_back() {
        // A small index: keys collide into runs.
        let words = region(MIN_WORDS * 2);
        let table = Table::init(&words, [5, 5], 0).unwrap();
        let clock = at(0);
        let keys: Vec<Vec<u8>> = (0..table.stats().max_records)
            .map(|i| format!("k{}", i).into_bytes())
            .collect();
        let mut live: Vec<&Vec<u8>> = Vec::new();
        for key in &keys {
            if table.get_or_insert_by(key, 1, &clock).is_ok() {
                live.push(key);
            }
        }
        assert!(live.len() > 4);
        // Remove every other key: the rest stay reachable past tombstones.
        for key in live.iter().step_by(2) {
            assert!(table.remove_if(key, &clock, |_| true).unwrap());
        }
        for (i, key) in live.iter().enumerate() {
            assert_eq!(table.lookup(key).is_some(), i % 2 == 1, "{:?}", key);
        }
        // Remove the rest: every tombstone ends a run, all taken back.
        for key in live.iter().skip(1).step_by(2) {
            assert!(table.remove_if(key, &clock, |_| true).unwrap());
        }
        let stats = table.stats();
        assert_eq!((stats.records, stats.tombstones), (0, 0));
        assert!((0..table.index_slots()).all(|slot| table.slot_entry(slot) == 0));
    }

    #[test]
    fn churn_runs_on_in_bounded_memory() {
        let words = region(MIN_WORDS * 8);
        let table = Table::init(&words, [7, 8], 0).unwrap();
        let clock = at(0);
        let mut live = std::collections::VecDeque::new();
        for i in 0..20_000u64 {
            // Two new keys a second: some 20 removed records wait out
            // their grace period at any time.
            clock.clock.store(i / 2, Relaxed);
            let key = format!("key-{:05}", i);
            let (record, made) = table.get_or_insert_by(key.as_bytes(), 3, &clock).unwrap();
            assert!(made);
            assert_eq!(record.cells()[1].load(Relaxed), 0);
            record.cells()[1].store(i, Relaxed);
            live.push_back((key, i));
            // 20 live keys: the arena holds 20,000 keys only by reuse.
            while live.len() > 20 {
                let (key, _) = live.pop_front().unwrap();
                assert!(table.remove_if(key.as_bytes(), &clock, |_| true).unwrap());
            }
            for (key, value) in live.iter().rev().take(3) {
                let record = table.lookup(key.as_bytes()).unwrap();
                assert_eq!(record.cells()[1].load(Relaxed), *value);
            }
        }
        let stats = table.stats();
        assert_eq!(stats.refused, 0);
        assert!(stats.reused > 19_000, "{:?}", stats);
        assert!(stats.arena_used < stats.arena_total, "{:?}", stats);
    }

    #[test]
    fn a_dead_holder_of_the_table_lock_is_taken_over() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let clock = at(0);
        table.get_or_insert_by(b"a", 1, &clock).unwrap();
        // A holder that died mid-removal: the slot emptied, the epoch not
        // bumped yet.
        let dead = Holder {
            pid: 99,
            instance: 3,
        };
        lock::try_lock(&words[TABLE_LOCK], dead, |_| true).unwrap();
        let survivor = At {
            pid: 100,
            dead: 99,
            clock: Default::default(),
        };
        let epoch = table.epoch();
        table.get_or_insert_by(b"b", 1, &survivor).unwrap();
        assert_eq!(table.epoch(), epoch + 1);
        assert_eq!(lock::holder(&words[TABLE_LOCK]), None);
    }

    #[test]
    fn a_live_holder_keeps_new_keys_waiting_then_busy() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let other = Holder {
            pid: 77,
            instance: 1,
        };
        lock::try_lock(&words[TABLE_LOCK], other, |_| true).unwrap();
        assert_eq!(
            table.get_or_insert_by(b"a", 1, &at(0)).unwrap_err(),
            Error::Busy
        );
        lock::unlock(&words[TABLE_LOCK], other);
        assert!(table.get_or_insert_by(b"a", 1, &at(0)).is_ok());
    }

    #[test]
    fn a_free_list_mended_after_a_holder_died_mid_push() {
        let words = region(4096);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let clock = at(0);
        for key in [&b"a"[..], b"b", b"c"] {
            table.get_or_insert_by(key, 1, &clock).unwrap();
        }
        table.remove_if(b"a", &clock, |_| true).unwrap();
        table.remove_if(b"b", &clock, |_| true).unwrap();
        // The push of b died between linking it and moving the tail.
        let base = FREE_LIST_BASE;
        let head = words[base + 1].load(Relaxed);
        words[base + 2].store(head, Relaxed);
        table.recover();
        assert_ne!(words[base + 2].load(Relaxed), head);
        table.remove_if(b"c", &clock, |_| true).unwrap();
        // All three come back, oldest first.
        clock.clock.store(GRACE_SECONDS, Relaxed);
        let reused: Vec<usize> = [&b"x"[..], b"y", b"z", b"w"]
            .iter()
            .map(|key| table.get_or_insert_by(key, 1, &clock).unwrap().0.offset())
            .collect();
        assert_eq!(table.stats().reused, 3);
        assert!(reused[0] < reused[1] && reused[1] < reused[2] && reused[2] < reused[3]);
    }

    #[test]
    fn removed_records_of_too_many_sizes_are_leaked_and_counted() {
        let words = region(1 << 14);
        let table = Table::init(&words, [1, 2], 0).unwrap();
        let clock = at(0);
        for width in 1..=FREE_LISTS as u32 + 1 {
            table.get_or_insert_by(b"k", width, &clock).unwrap();
            table.remove_if(b"k", &clock, |_| true).unwrap();
        }
        let stats = table.stats();
        assert_eq!(stats.free, FREE_LISTS as u64);
        assert_eq!(stats.leaked, 2 + 1 + FREE_LISTS as u64 + 1);
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
