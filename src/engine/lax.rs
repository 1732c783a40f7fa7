//! Lax counters on Redis in the engine: each key's total added by every
//! worker, the part of it already sent to Redis, and a journal per counter
//! that makes a flush move every worker's counts exactly once, whichever
//! worker flushes and wherever a flusher is killed. docs/engine.md
//! ("Lax on Redis") is the design.
//!
//! A key's record (kind [`KIND`], key `name/key`) has [`WIDTH`] cells:
//!
//! ```text
//! 0 added   every worker's inc/dec, i64, compare-and-swap (checked)
//! 1 sent    the part of `added` Redis has, moved only under the lock
//! 2 ttl     the TTL (ms) the first inc with a ttl asked for, 0: none
//! 3 seen    the Redis value last seen (by a flush or a get)
//! 4 seen?   1 once `seen` holds a value
//! ```
//!
//! A counter's journal (kind [`JOURNAL_KIND`], key `name`) holds its lock
//! word, a nonce, the batch sequence, the batch in flight (0: none) and its
//! entries: per key its record's offset, the delta sent, the `sent` total
//! the key gets once Redis has the batch, and the TTL sent.
//!
//! The order that makes "exactly once" hold (every step a single atomic
//! word write; a flusher may die between any two):
//!
//! 1. take the lock (a dead holder's is taken over);
//! 2. a batch in flight: go to 4 with it (its id is nonce:seq, as sent);
//! 3. write the entries (`delta = added - sent` read once per key, `target
//!    = sent + delta`), the count, then the new sequence number into
//!    `in flight` (Release): the batch exists only from this store on;
//! 4. send it under its id (the Redis script applies an id once);
//! 5. Redis has it: store each key's `sent = target` (a store, so doing it
//!    again after a takeover changes nothing), clear its TTL request, then
//!    clear `in flight`. Surely not sent: clear `in flight` only. Unknown:
//!    leave it (the next flush, any worker's, resends it first);
//! 6. release the lock.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::cell;
use super::word::Word;
use super::Error;

/// The kind byte of a lax key's record.
pub const KIND: u8 = b'l';

/// The kind byte of a lax counter's journal.
pub const JOURNAL_KIND: u8 = b'j';

/// Cells of a lax key's record.
pub const WIDTH: u32 = 5;

const ADDED: usize = 0;
const SENT: usize = 1;
const TTL: usize = 2;
const SEEN: usize = 3;
const SEEN_SET: usize = 4;

/// Keys in one batch (one journal): 4 words each, so a journal takes
/// 8 KiB of the engine. A flush sends as many batches as it needs.
pub const MAX_BATCH: usize = 256;

const J_LOCK: usize = 0;
const J_NONCE: usize = 1;
const J_SEQ: usize = 2;
const J_IN_FLIGHT: usize = 3;
const J_COUNT: usize = 4;
const J_ENTRIES: usize = 5;
const ENTRY_WORDS: usize = 4;

/// Cells of a journal record.
pub const JOURNAL_WIDTH: u32 = (J_ENTRIES + ENTRY_WORDS * MAX_BATCH) as u32;

/// One lax key's cells.
#[derive(Debug)]
pub struct Key<'a, W: Word> {
    cells: &'a [W],
}

impl<'a, W: Word> Clone for Key<'a, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<'a, W: Word> Copy for Key<'a, W> {}

/// What a key has not yet sent: `added - sent`, within the `i64` range.
fn unflushed(added: i64, sent: i64) -> i64 {
    let difference = i128::from(added) - i128::from(sent);
    difference.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

impl<'a, W: Word> Key<'a, W> {
    /// A key over a record's cells ([`WIDTH`] of them at least).
    pub fn new(cells: &'a [W]) -> Key<'a, W> {
        debug_assert!(cells.len() >= WIDTH as usize);
        Key { cells }
    }

    /// Adds `step` (an inc or a dec) and returns what is now unsent.
    ///
    /// # Errors
    ///
    /// `Overflow` when the total added would leave the `i64` range (as
    /// Redis' INCRBY refuses); nothing changes.
    #[inline]
    pub fn add(&self, step: i64) -> Result<i64, Error> {
        let added = cell::add_i64(&self.cells[ADDED], step)?;
        Ok(unflushed(added, cell::load_i64(&self.cells[SENT])))
    }

    /// Every worker's counts since the key was made, sent or not.
    pub fn added(&self) -> i64 {
        cell::load_i64(&self.cells[ADDED])
    }

    /// Every worker's counts not yet in Redis.
    pub fn unsent(&self) -> i64 {
        let sent = cell::load_i64(&self.cells[SENT]);
        unflushed(cell::load_i64(&self.cells[ADDED]), sent)
    }

    /// Asks for `ms` (non-zero) as the key's TTL when a flush creates it in
    /// Redis; the first request stays until a flush has sent it.
    pub fn request_ttl(&self, ms: u64) {
        if ms != 0 && self.cells[TTL].load(Relaxed) == 0 {
            let _ = self.cells[TTL].compare_exchange(0, ms, Relaxed, Relaxed);
        }
    }

    /// The Redis value last seen, if any.
    pub fn seen(&self) -> Option<i64> {
        if self.cells[SEEN_SET].load(Acquire) == 0 {
            None
        } else {
            Some(cell::load_i64(&self.cells[SEEN]))
        }
    }

    pub fn set_seen(&self, value: i64) {
        self.cells[SEEN].store(value as u64, Relaxed);
        self.cells[SEEN_SET].store(1, Release);
    }

    /// Drops what is unsent (a strict set or delete of the key made it
    /// moot). Only under the journal's lock, with no batch in flight.
    pub fn forget(&self) {
        self.cells[SENT].store(self.cells[ADDED].load(Acquire), Release);
        self.cells[TTL].store(0, Relaxed);
    }

    /// The key's entry in a new batch, if it has anything to send:
    /// (delta, target, ttl).
    fn outstanding(&self) -> Option<(i64, i64, u64)> {
        let sent = cell::load_i64(&self.cells[SENT]);
        let added = cell::load_i64(&self.cells[ADDED]);
        let ttl = self.cells[TTL].load(Relaxed);
        if added == sent && ttl == 0 {
            return None;
        }
        let delta = unflushed(added, sent);
        // Between sent and added, so within the i64 range.
        Some((delta, sent.wrapping_add(delta), ttl))
    }

    /// Moves the key's sent total to `target` and clears the TTL request
    /// `ttl` (one entry of an applied batch). A store, so doing it again
    /// changes nothing. Only under the journal's lock.
    pub fn settle(&self, target: i64, ttl: u64) {
        self.cells[SENT].store(target as u64, Release);
        if ttl != 0 {
            let _ = self.cells[TTL].compare_exchange(ttl, 0, Relaxed, Relaxed);
        }
    }
}

/// One entry of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The key's record offset in the region.
    pub offset: u64,
    /// What the batch adds to the key in Redis.
    pub delta: i64,
    /// The key's `sent` once Redis has the batch.
    pub target: i64,
    /// The TTL (ms) to give the key if the batch creates it; 0: none.
    pub ttl: u64,
}

/// How a sent batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Redis has it (applied now, or before under the same id).
    Applied,
    /// It may or may not have run: kept, to be sent again under its id.
    Unknown,
    /// It surely did not reach Redis: dropped from the journal, its
    /// deltas still unsent in the keys.
    NotSent,
}

/// A lax counter's journal cells.
#[derive(Debug)]
pub struct Journal<'a, W: Word> {
    cells: &'a [W],
}

impl<'a, W: Word> Journal<'a, W> {
    /// A journal over a record's cells ([`JOURNAL_WIDTH`] of them).
    ///
    /// # Errors
    ///
    /// `BadWidth` for fewer cells.
    pub fn new(cells: &'a [W]) -> Result<Journal<'a, W>, Error> {
        if cells.len() < JOURNAL_WIDTH as usize {
            return Err(Error::BadWidth);
        }
        Ok(Journal { cells })
    }

    /// The flush lock of this counter (see [`super::lock`]).
    pub fn lock_word(&self) -> &'a W {
        &self.cells[J_LOCK]
    }

    /// The journal's nonce, made from `random` (non-zero) by the first
    /// caller: batch ids are `nonce:seq`, unique across engines (an nginx
    /// restarted makes new ones) as Redis keeps applied ids for an hour.
    pub fn nonce(&self, random: u64) -> u64 {
        let nonce = self.cells[J_NONCE].load(Acquire);
        if nonce != 0 {
            return nonce;
        }
        match self.cells[J_NONCE].compare_exchange(0, random | 1, Release, Acquire) {
            Ok(_) => random | 1,
            Err(theirs) => theirs,
        }
    }

    /// The sequence number of the batch in flight (0: none).
    pub fn in_flight(&self) -> u64 {
        self.cells[J_IN_FLIGHT].load(Acquire)
    }

    /// The entries of the batch in flight (none when there is none).
    pub fn len(&self) -> usize {
        if self.in_flight() == 0 {
            return 0;
        }
        (self.cells[J_COUNT].load(Relaxed) as usize).min(MAX_BATCH)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i` (below [`Journal::len`]).
    pub fn entry(&self, i: usize) -> Entry {
        let at = J_ENTRIES + ENTRY_WORDS * i.min(MAX_BATCH - 1);
        Entry {
            offset: self.cells[at].load(Relaxed),
            delta: self.cells[at + 1].load(Relaxed) as i64,
            target: self.cells[at + 2].load(Relaxed) as i64,
            ttl: self.cells[at + 3].load(Relaxed),
        }
    }

    /// Writes a new batch of the keys that have something to send (at most
    /// [`MAX_BATCH`], in the order given) and puts it in flight; its
    /// sequence number, or 0 when no key had anything to send. Only under
    /// the lock, with no batch in flight.
    pub fn build(&self, keys: impl Iterator<Item = (u64, Key<'a, W>)>) -> u64 {
        debug_assert_eq!(self.in_flight(), 0);
        let mut count = 0;
        for (offset, key) in keys {
            if count == MAX_BATCH {
                break;
            }
            if let Some((delta, target, ttl)) = key.outstanding() {
                let at = J_ENTRIES + ENTRY_WORDS * count;
                self.cells[at].store(offset, Relaxed);
                self.cells[at + 1].store(delta as u64, Relaxed);
                self.cells[at + 2].store(target as u64, Relaxed);
                self.cells[at + 3].store(ttl, Relaxed);
                count += 1;
            }
        }
        if count == 0 {
            return 0;
        }
        self.cells[J_COUNT].store(count as u64, Relaxed);
        let seq = self.cells[J_SEQ].load(Relaxed).wrapping_add(1).max(1);
        self.cells[J_SEQ].store(seq, Relaxed);
        // The commit: the entries above are the batch from here on.
        self.cells[J_IN_FLIGHT].store(seq, Release);
        seq
    }

    /// Ends the batch in flight as `outcome` says. `key_at` finds a key's
    /// cells by its record offset. Only under the lock.
    pub fn settle(&self, outcome: Outcome, key_at: impl Fn(u64) -> Option<Key<'a, W>>) {
        match outcome {
            Outcome::Unknown => return,
            Outcome::NotSent => {}
            Outcome::Applied => {
                for i in 0..self.len() {
                    let entry = self.entry(i);
                    if let Some(key) = key_at(entry.offset) {
                        key.settle(entry.target, entry.ttl);
                    }
                }
            }
        }
        self.cells[J_IN_FLIGHT].store(0, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn cells(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    struct Model {
        keys: Vec<Vec<AtomicU64>>,
        journal: Vec<AtomicU64>,
    }

    impl Model {
        fn new(keys: usize) -> Model {
            Model {
                keys: (0..keys).map(|_| cells(WIDTH as usize)).collect(),
                journal: cells(JOURNAL_WIDTH as usize),
            }
        }

        fn key(&self, i: usize) -> Key<'_, AtomicU64> {
            Key::new(&self.keys[i])
        }

        fn journal(&self) -> Journal<'_, AtomicU64> {
            Journal::new(&self.journal).unwrap()
        }

        fn build(&self) -> u64 {
            self.journal()
                .build((0..self.keys.len()).map(|i| (i as u64, self.key(i))))
        }

        fn settle(&self, outcome: Outcome) {
            self.journal()
                .settle(outcome, |offset| Some(self.key(offset as usize)));
        }

        /// Applies the batch in flight to `redis` once per id.
        fn send(&self, redis: &mut [i64], applied: &mut Vec<u64>) {
            let journal = self.journal();
            let id = journal.in_flight();
            if applied.contains(&id) {
                return;
            }
            applied.push(id);
            for i in 0..journal.len() {
                let entry = journal.entry(i);
                redis[entry.offset as usize] += entry.delta;
            }
        }
    }

    #[test]
    fn adds_are_unsent_until_a_batch_is_applied() {
        let model = Model::new(2);
        assert_eq!(model.key(0).add(5).unwrap(), 5);
        assert_eq!(model.key(0).add(-2).unwrap(), 3);
        assert_eq!(model.build(), 1);
        assert_eq!(model.journal().len(), 1);
        assert_eq!(
            model.journal().entry(0),
            Entry {
                offset: 0,
                delta: 3,
                target: 3,
                ttl: 0
            }
        );
        // An add while the batch is out stays for the next one.
        model.key(0).add(4).unwrap();
        model.settle(Outcome::Applied);
        assert_eq!(model.journal().in_flight(), 0);
        assert_eq!(model.key(0).unsent(), 4);
        assert_eq!(model.build(), 2);
        assert_eq!(model.journal().entry(0).delta, 4);
    }

    #[test]
    fn unknown_keeps_the_batch_and_not_sent_gives_it_back() {
        let model = Model::new(1);
        model.key(0).add(7).unwrap();
        let seq = model.build();
        model.settle(Outcome::Unknown);
        assert_eq!(model.journal().in_flight(), seq);
        assert_eq!(model.key(0).unsent(), 7);
        model.settle(Outcome::NotSent);
        assert_eq!(model.journal().in_flight(), 0);
        assert_eq!(model.key(0).unsent(), 7);
        assert_ne!(model.build(), seq);
    }

    #[test]
    fn settling_twice_moves_once() {
        let model = Model::new(1);
        model.key(0).add(7).unwrap();
        model.build();
        let journal = model.journal();
        // A flusher killed after moving the key but before clearing the
        // journal: the next one settles the same batch again.
        model
            .key(0)
            .settle(journal.entry(0).target, journal.entry(0).ttl);
        model.key(0).add(1).unwrap();
        model.settle(Outcome::Applied);
        assert_eq!(model.key(0).unsent(), 1);
    }

    #[test]
    fn nothing_to_send_builds_nothing() {
        let model = Model::new(3);
        assert_eq!(model.build(), 0);
        assert_eq!(model.journal().in_flight(), 0);
        model.key(1).request_ttl(1500);
        assert_eq!(model.build(), 1);
        assert_eq!(
            model.journal().entry(0),
            Entry {
                offset: 1,
                delta: 0,
                target: 0,
                ttl: 1500
            }
        );
        model.settle(Outcome::Applied);
        assert_eq!(model.build(), 0);
    }

    #[test]
    fn the_first_ttl_stays_until_sent() {
        let model = Model::new(1);
        model.key(0).request_ttl(1000);
        model.key(0).request_ttl(2000);
        model.key(0).add(1).unwrap();
        model.build();
        assert_eq!(model.journal().entry(0).ttl, 1000);
    }

    #[test]
    fn overflow_is_refused_like_incrby() {
        let model = Model::new(1);
        model.key(0).add(i64::MAX).unwrap();
        assert_eq!(model.key(0).add(1), Err(Error::Overflow));
        assert_eq!(model.key(0).unsent(), i64::MAX);
        model.key(0).add(i64::MIN).unwrap();
        model.build();
        model.settle(Outcome::Applied);
        assert_eq!(model.key(0).add(i64::MIN + 1).unwrap(), i64::MIN + 1);
    }

    #[test]
    fn batches_hold_at_most_max_batch_keys() {
        let model = Model::new(MAX_BATCH + 3);
        for i in 0..MAX_BATCH + 3 {
            model.key(i).add(1).unwrap();
        }
        model.build();
        assert_eq!(model.journal().len(), MAX_BATCH);
        model.settle(Outcome::Applied);
        model.build();
        assert_eq!(model.journal().len(), 3);
    }

    #[test]
    fn forget_drops_the_unsent() {
        let model = Model::new(1);
        model.key(0).add(3).unwrap();
        model.key(0).request_ttl(10);
        model.key(0).forget();
        assert_eq!(model.key(0).unsent(), 0);
        assert_eq!(model.build(), 0);
    }

    #[test]
    fn the_nonce_is_made_once() {
        let model = Model::new(0);
        let nonce = model.journal().nonce(42);
        assert_eq!(nonce, 43);
        assert_eq!(model.journal().nonce(8), 43);
    }

    #[test]
    fn seen_is_absent_until_set() {
        let model = Model::new(1);
        assert_eq!(model.key(0).seen(), None);
        model.key(0).set_seen(-9);
        assert_eq!(model.key(0).seen(), Some(-9));
    }

    /// A flusher cut off after every step of the order, and the next one
    /// recovering: Redis ends exactly at the total added, every time.
    #[test]
    fn a_flusher_stopped_anywhere_moves_every_count_once() {
        for stop in 0..5 {
            let model = Model::new(3);
            let mut redis = vec![0; 3];
            let mut applied = Vec::new();
            for i in 0..3 {
                model.key(i).add(i as i64 + 1).unwrap();
            }
            // The first flusher, stopped after step `stop`.
            model.build();
            if stop >= 1 {
                model.send(&mut redis, &mut applied);
            }
            if stop >= 2 {
                let journal = model.journal();
                let entry = journal.entry(0);
                model.key(0).settle(entry.target, entry.ttl);
            }
            if stop >= 3 {
                model.settle(Outcome::Applied);
            }
            model.key(1).add(10).unwrap();
            // The next flusher: the batch in flight first, then a new one.
            for _ in 0..2 {
                if model.journal().in_flight() == 0 {
                    model.build();
                }
                model.send(&mut redis, &mut applied);
                model.settle(Outcome::Applied);
            }
            assert_eq!(redis, vec![1, 12, 3], "stopped after step {}", stop);
            for i in 0..3 {
                assert_eq!(model.key(i).unsent(), 0);
            }
        }
    }
}
