//! Strict counters' records in the engine: a value and its state in one
//! 16-byte pair, changed by a double-width compare-and-swap, so that a
//! single-key update is one atomic step with no lock; batches and
//! snapshots freeze their records under one batch lock and a journal, so
//! that they are all-or-nothing and consistent even when their process is
//! killed halfway (docs/engine.md, "Strict records").
//!
//! The pair is `[value, meta]`:
//!
//! - value: the `i64` (its bits), meaningful when the key is present;
//! - meta: [`PRESENT`], [`FROZEN`] (a batch holds the record),
//!   [`TOUCHED`] (0 only in a record nobody has written yet: the dict's
//!   value from an older version may still be imported), and the expiry in
//!   milliseconds since the epoch above [`EXPIRY_SHIFT`] (0: none).
//!
//! What an update computes (the arithmetic, Redis' rules) is the caller's:
//! this module is the protocol, generic over the pair (hardware or loom's
//! model of it) and over the caller's error.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::dwcas;
use super::lock::{self, Holder, Taken};
use super::word::Word;

/// The first byte of every strict key in the table.
pub const KIND: u8 = b's';

/// Cells per strict record: three words hold one 16-byte aligned pair
/// wherever the record starts (cells are 8-byte aligned).
pub const WIDTH: u32 = 3;

/// The key is present (not deleted, not yet created).
pub const PRESENT: u64 = 1;
/// A batch holds the record: single updates wait (or help).
pub const FROZEN: u64 = 2;
/// Someone wrote the record (or imported into it).
pub const TOUCHED: u64 = 4;
/// The expiry (ms since the epoch, 0 none) sits above the flags.
pub const EXPIRY_SHIFT: u32 = 3;

/// The pair of a record a remover took (or is taking) out of the table:
/// FROZEN with no other flag and every value bit set, a pair no batch or
/// update ever writes (a frozen pair of a batch is TOUCHED, or `[0,
/// FROZEN]`). Terminal: nothing writes a GONE pair, so an update that
/// meets it has not landed and looks its key up again; the remover moves
/// a pair here only from the exact absent or expired pair it judged
/// ([`retire`]). As it carries FROZEN, the update's fast path (not frozen)
/// needs no test of its own for it.
pub const GONE: [u64; 2] = [u64::MAX, FROZEN];

/// The batch control record's cells: the batch lock, the journal's state,
/// its entries and where it is.
pub const CONTROL_WIDTH: u32 = 4;
const C_LOCK: usize = 0;
const C_STATE: usize = 1;
const C_COUNT: usize = 2;
const C_JOURNAL: usize = 3;

const IDLE: u64 = 0;
/// The journal lists the records the batch freezes (or has frozen).
const FREEZING: u64 = 1;
/// The journal holds every record's new pair: the batch has decided.
const COMMITTED: u64 = 2;

/// Words per journal entry: the pair's address, its new value and meta.
pub const ENTRY_WORDS: usize = 3;

/// A 16-byte cell of `[value, meta]` with a double-width compare-and-swap.
pub trait Pair: Send + Sync {
    /// The pair, read atomically.
    fn load(&self) -> [u64; 2];
    /// The pair, read as two words: maybe torn, good enough to compute a
    /// compare-and-swap that then checks it.
    fn load_fast(&self) -> [u64; 2] {
        self.load()
    }
    /// Replaces `current` by `new` in one step; else the pair as it is.
    fn compare_exchange(&self, current: [u64; 2], new: [u64; 2]) -> Result<(), [u64; 2]>;
}

/// A key's state as an update sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    /// The value; 0 when not [`live`](Current::live).
    pub value: i64,
    /// Present and not expired.
    pub live: bool,
    /// Its expiry (ms since the epoch; 0 none), when live.
    pub expiry_ms: u64,
}

/// What an update does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing (a comparison that failed, a read).
    Keep,
    /// The key becomes present with this value and expiry.
    Write { value: i64, expiry_ms: u64 },
    /// The key becomes absent.
    Remove,
}

/// Why an update did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused<E> {
    /// A batch holds the record (single updates), or the batch lock
    /// (batches): see [`help`], then try again.
    Busy,
    /// The record was removed ([`GONE`]): nothing changed; look the key
    /// up again (a batch: with the index of that record among its pairs).
    Gone(usize),
    /// The caller's computation refused (an overflow, ...); nothing
    /// changed. For a batch, with the index of the update.
    Op(E),
}

/// The expiry of a key once written: a new key (or a set) gets `ttl_ms`
/// from now (0: none); an increment of a live key keeps what it had.
pub fn expiry_after(current: &Current, replaces: bool, ttl_ms: u64, now: impl Fn() -> u64) -> u64 {
    if current.live && !replaces {
        current.expiry_ms
    } else if ttl_ms == 0 {
        0
    } else {
        now().saturating_add(ttl_ms)
    }
}

/// The key's state in `pair` at `now` (read only when the key expires).
pub fn current(pair: [u64; 2], now: impl Fn() -> u64) -> Current {
    let [value, meta] = pair;
    let expiry_ms = meta >> EXPIRY_SHIFT;
    let live = meta & PRESENT != 0 && (expiry_ms == 0 || now() < expiry_ms);
    if live {
        Current {
            value: value as i64,
            live,
            expiry_ms,
        }
    } else {
        Current {
            value: 0,
            live,
            expiry_ms: 0,
        }
    }
}

fn written(change: Change, frozen: u64) -> Option<[u64; 2]> {
    match change {
        Change::Keep => None,
        Change::Write { value, expiry_ms } => Some([
            value as u64,
            (expiry_ms << EXPIRY_SHIFT) | TOUCHED | PRESENT | frozen,
        ]),
        Change::Remove => Some([0, TOUCHED | frozen]),
    }
}

/// One update of one key, lock-free: reads the pair, lets `decide` say
/// what to do with the key's [`Current`] state, and writes that by one
/// compare-and-swap (calling `decide` again when another writer came
/// first). Returns the state `decide` last saw. `decide` must depend on
/// its argument only: it may be called more than once.
///
/// # Errors
///
/// [`Refused::Busy`] when a batch holds the record; [`Refused::Op`] when
/// `decide` refuses. Nothing changed then.
pub fn update<P: Pair, E>(
    pair: &P,
    now: impl Fn() -> u64 + Copy,
    mut decide: impl FnMut(&Current) -> Result<Change, E>,
) -> Result<Current, Refused<E>> {
    let mut seen = pair.load_fast();
    // Whether `seen` was read whole (the fast read may be torn: only a
    // compare-and-swap checks it, so a decision that writes nothing is
    // taken again on a whole read).
    let mut whole = false;
    loop {
        if seen[1] & FROZEN == 0 {
            let state = current(seen, now);
            match decide(&state) {
                Ok(change) => match written(change, 0) {
                    Some(new) => match pair.compare_exchange(seen, new) {
                        Ok(()) => return Ok(state),
                        Err(there) => {
                            seen = there;
                            whole = true;
                            continue;
                        }
                    },
                    None if whole => return Ok(state),
                    None => {}
                },
                Err(e) if whole => return Err(Refused::Op(e)),
                Err(_) => {}
            }
        } else if whole {
            // Only here, off the fast path: GONE carries FROZEN.
            return Err(if seen == GONE {
                Refused::Gone(0)
            } else {
                Refused::Busy
            });
        }
        seen = pair.load();
        whole = true;
    }
}

/// The key's state now, read atomically.
///
/// # Errors
///
/// `Busy` when a batch holds the record.
pub fn get<P: Pair>(pair: &P, now: impl Fn() -> u64) -> Result<Current, Refused<()>> {
    let seen = pair.load();
    if seen == GONE {
        // Removed: absent (its key has no record, or a new one).
        return Ok(current([0, TOUCHED], now));
    }
    if seen[1] & FROZEN != 0 {
        return Err(Refused::Busy);
    }
    Ok(current(seen, now))
}

/// Whether a pair may be removed at `now`: [`GONE`] already, or written,
/// not frozen, and absent (deleted) or expired. An untouched pair (a
/// worker made the record and is about to import into it) and a frozen one
/// (a batch holds it) are kept.
pub fn reclaimable(pair: [u64; 2], now: impl Fn() -> u64) -> bool {
    let meta = pair[1];
    pair == GONE || (meta & (FROZEN | TOUCHED) == TOUCHED && !current(pair, now).live)
}

/// Moves a record that is [`reclaimable`] to [`GONE`], by a
/// compare-and-swap from the exact pair judged (an update that lands
/// first makes the key live, or changes the pair: judged again). True when
/// the pair is GONE: from then on no update lands in it and the record may
/// leave the table (the caller removes it under the table lock, asking
/// this again there).
pub fn retire<P: Pair>(pair: &P, now: impl Fn() -> u64 + Copy) -> bool {
    let mut seen = pair.load();
    loop {
        if seen == GONE {
            return true;
        }
        if !reclaimable(seen, now) {
            return false;
        }
        match pair.compare_exchange(seen, GONE) {
            Ok(()) => return true,
            Err(there) => seen = there,
        }
    }
}

/// Whether nobody has written the record yet (see [`import`]).
pub fn untouched<P: Pair>(pair: &P) -> bool {
    pair.load()[1] & TOUCHED == 0
}

/// Gives an untouched record its first state (a value an older version of
/// the library left in the dict, or none): once; false when the record was
/// touched already (or a batch holds it: try again).
pub fn import<P: Pair>(pair: &P, value: Option<(i64, u64)>) -> bool {
    let new = match value {
        Some((value, expiry_ms)) => written(Change::Write { value, expiry_ms }, 0),
        None => written(Change::Remove, 0),
    };
    new.map_or(false, |new| pair.compare_exchange([0, 0], new).is_ok())
}

/// The batch lock's side of things: its control cells ([`CONTROL_WIDTH`]),
/// who this process is and how to tell whether a holder lives.
pub struct Batches<'a, W: Word> {
    pub control: &'a [W],
    pub me: Holder,
    pub alive: &'a dyn Fn(u32) -> bool,
}

/// # Safety
///
/// `address` is a pair's address that a batch wrote into the journal: the
/// pair lives as long as the region.
unsafe fn pair_at<'p, P: Pair>(address: u64) -> &'p P {
    &*(address as usize as *const P)
}

/// # Safety
///
/// `control` holds a journal that a batch under the lock wrote.
unsafe fn journal_of<'j, W: Word>(control: &[W]) -> &'j [W] {
    let count = control[C_COUNT].load(Acquire) as usize;
    let address = control[C_JOURNAL].load(Acquire) as usize;
    if count == 0 || address == 0 {
        return &[];
    }
    std::slice::from_raw_parts(address as *const W, count * ENTRY_WORDS)
}

/// Spins on a pair until it is frozen and unfreezes it to `to` (or as it
/// is): only the batch lock's holder calls it, and only it freezes.
fn thaw<P: Pair>(pair: &P, to: Option<[u64; 2]>) {
    let mut seen = pair.load();
    // A GONE pair was never frozen by a batch: a record the batch had
    // unfrozen, then removed.
    while seen[1] & FROZEN != 0 && seen != GONE {
        let new = to.unwrap_or([seen[0], seen[1] & !FROZEN]);
        match pair.compare_exchange(seen, new) {
            Ok(()) => return,
            Err(now) => seen = now,
        }
    }
}

impl<'a, W: Word> Batches<'a, W> {
    /// Finishes what a dead batch left: rolls it back (it had not
    /// decided: every record it froze is unfrozen as it was) or forward
    /// (it had: every record still frozen gets its new pair). Records it
    /// had already unfrozen were written since, maybe by single updates:
    /// they are left alone. Called by the lock's holder.
    ///
    /// # Safety
    ///
    /// The journal's addresses are pairs of type `P`.
    unsafe fn recover<P: Pair>(&self) {
        let state = self.control[C_STATE].load(Acquire);
        if state != IDLE {
            let journal = journal_of(self.control);
            for entry in journal.chunks(ENTRY_WORDS) {
                let pair = pair_at::<P>(entry[0].load(Relaxed));
                let to = if state == COMMITTED {
                    Some([entry[1].load(Relaxed), entry[2].load(Relaxed)])
                } else {
                    None
                };
                thaw(pair, to);
            }
        }
        self.control[C_STATE].store(IDLE, Release);
    }

    fn take(&self) -> Result<Taken, Holder> {
        lock::try_lock(&self.control[C_LOCK], self.me, self.alive)
    }

    /// What a single update that met a frozen record calls: when the batch
    /// that froze it is gone (its holder died), finishes it. True when the
    /// lock was free (or taken over and finished): the update may try
    /// again at once; false while a live batch holds it.
    ///
    /// # Safety
    ///
    /// As [`Batches::run`].
    pub unsafe fn help<P: Pair>(&self) -> bool {
        match self.take() {
            Ok(_) => {
                self.recover::<P>();
                lock::unlock(&self.control[C_LOCK], self.me);
                true
            }
            Err(_) => false,
        }
    }

    /// Begins a batch over `pairs` (distinct): takes the batch lock
    /// (finishing what a dead holder left), lists the pairs in `journal`
    /// (at least [`ENTRY_WORDS`] words a pair) and freezes them. The
    /// [`Open`] batch then commits its changes or not and finishes; a
    /// process killed at any point leaves what the next holder finishes.
    ///
    /// # Errors
    ///
    /// [`Refused::Busy`] when another live batch holds the lock;
    /// [`Refused::Gone`] with the index of a pair that was removed (every
    /// pair frozen so far is unfrozen as it was, the lock freed: look its
    /// key up again).
    ///
    /// # Safety
    ///
    /// Every pair and the journal live as long as the region, and every
    /// batch on this control record uses pairs of type `P`.
    pub unsafe fn begin<'b, P: Pair>(
        &'b self,
        pairs: &'b [&'b P],
        journal: &'b [W],
    ) -> Result<Open<'b, 'a, P, W>, Refused<()>> {
        assert!(
            journal.len() >= pairs.len() * ENTRY_WORDS,
            "journal too short"
        );
        self.take().map_err(|_| Refused::Busy)?;
        // Free or taken from a dead holder: finish whatever it left.
        self.recover::<P>();

        for (entry, pair) in journal.chunks(ENTRY_WORDS).zip(pairs) {
            entry[0].store(*pair as *const P as usize as u64, Relaxed);
        }
        self.control[C_COUNT].store(pairs.len() as u64, Relaxed);
        self.control[C_JOURNAL].store(journal.as_ptr() as usize as u64, Relaxed);
        self.control[C_STATE].store(FREEZING, Release);

        let mut frozen = Vec::with_capacity(pairs.len());
        for (i, pair) in pairs.iter().enumerate() {
            let mut seen = pair.load();
            loop {
                if seen == GONE {
                    // Rolled back as a dead batch's would be (FREEZING).
                    for pair in &pairs[..i] {
                        thaw(*pair, None);
                    }
                    self.control[C_STATE].store(IDLE, Release);
                    lock::unlock(&self.control[C_LOCK], self.me);
                    return Err(Refused::Gone(i));
                }
                debug_assert!(seen[1] & FROZEN == 0, "frozen outside a batch");
                match pair.compare_exchange(seen, [seen[0], seen[1] | FROZEN]) {
                    Ok(()) => break,
                    Err(now) => seen = now,
                }
            }
            frozen.push(seen);
        }
        Ok(Open {
            batches: self,
            pairs,
            journal,
            frozen,
            committed: false,
        })
    }

    /// A whole batch: [`begin`](Batches::begin), `decide` turns the
    /// records' [`Current`] states (into `states`) into changes (into
    /// `changes`), all or none, then commit and finish. A snapshot is a
    /// batch whose `decide` keeps everything.
    ///
    /// # Errors
    ///
    /// [`Refused::Busy`] when another live batch holds the lock;
    /// [`Refused::Gone`] as [`Batches::begin`]; [`Refused::Op`] with
    /// `decide`'s error (nothing changed).
    ///
    /// # Safety
    ///
    /// As [`Batches::begin`].
    pub unsafe fn run<P: Pair, E>(
        &self,
        pairs: &[&P],
        journal: &[W],
        now: impl Fn() -> u64 + Copy,
        decide: impl FnOnce(&[Current], &mut [Change]) -> Result<(), E>,
        states: &mut Vec<Current>,
        changes: &mut Vec<Change>,
    ) -> Result<(), Refused<E>> {
        let mut open = self
            .begin(pairs, journal)
            .map_err(|refused| match refused {
                Refused::Gone(i) => Refused::Gone(i),
                _ => Refused::Busy,
            })?;
        states.clear();
        states.extend(open.frozen.iter().map(|&seen| current(seen, now)));
        changes.clear();
        changes.resize(pairs.len(), Change::Keep);
        let decided = decide(states, changes);
        if decided.is_ok() {
            open.commit(changes);
        }
        open.finish();
        decided.map_err(Refused::Op)
    }
}

/// A batch that holds the lock and its records frozen.
pub struct Open<'b, 'a, P: Pair, W: Word> {
    batches: &'b Batches<'a, W>,
    pairs: &'b [&'b P],
    journal: &'b [W],
    frozen: Vec<[u64; 2]>,
    committed: bool,
}

impl<'b, 'a, P: Pair, W: Word> Open<'b, 'a, P, W> {
    /// The records' states as frozen.
    pub fn states(&self, now: impl Fn() -> u64 + Copy) -> Vec<Current> {
        self.frozen.iter().map(|&seen| current(seen, now)).collect()
    }

    /// Decides: writes every record's new pair into the journal, then
    /// marks it committed (one store: from there a dead batch is rolled
    /// forward). Changes that all keep commit nothing.
    pub fn commit(&mut self, changes: &[Change]) {
        let mut writes = false;
        let entries = self.journal.chunks(ENTRY_WORDS);
        for ((entry, change), seen) in entries.zip(changes).zip(&self.frozen) {
            let new = match written(*change, 0) {
                Some(new) => {
                    writes = true;
                    new
                }
                None => *seen,
            };
            entry[1].store(new[0], Relaxed);
            entry[2].store(new[1], Relaxed);
        }
        if writes {
            self.batches.control[C_STATE].store(COMMITTED, Release);
            self.committed = true;
        }
    }

    /// Unfreezes every record (to its new pair when committed), then
    /// frees the journal and the lock.
    pub fn finish(self) {
        for (i, pair) in self.pairs.iter().enumerate() {
            let to = if self.committed {
                let entry = &self.journal[i * ENTRY_WORDS..];
                Some([entry[1].load(Relaxed), entry[2].load(Relaxed)])
            } else {
                None
            };
            thaw(*pair, to);
        }
        let control = self.batches.control;
        control[C_STATE].store(IDLE, Release);
        lock::unlock(&control[C_LOCK], self.batches.me);
    }
}

/// A pair in memory: 16 bytes, 16-byte aligned, changed by the hardware's
/// 16-byte compare-and-swap ([`dwcas`]: `lock cmpxchg16b` on x86_64,
/// `caspal` or an `ldaxp`/`stlxp` loop on aarch64; [`supported`]
/// checks). The cells of the table are words, so its two halves are also
/// read as 64-bit atomics ([`Pair::load_fast`]): mixed-size access, which
/// the hardware orders like any other.
#[repr(C, align(16))]
pub struct AtomicPair {
    words: [std::sync::atomic::AtomicU64; 2],
}

impl AtomicPair {
    /// The pair of a strict record's cells: the 16-byte aligned two of its
    /// [`WIDTH`] words.
    ///
    /// # Safety
    ///
    /// `cells` is a strict record's cells (three words, valid for `'a`).
    pub unsafe fn of_cells<'a>(cells: *const std::sync::atomic::AtomicU64) -> &'a AtomicPair {
        let address = (cells as usize + 15) & !15;
        &*(address as *const AtomicPair)
    }
}

/// Whether this CPU has the double-width compare-and-swap.
pub fn supported() -> bool {
    dwcas::supported()
}

impl Pair for AtomicPair {
    fn load(&self) -> [u64; 2] {
        // A compare-and-swap of [0, 0] by itself reads the pair whole.
        match self.compare_exchange([0, 0], [0, 0]) {
            Ok(()) => [0, 0],
            Err(seen) => seen,
        }
    }

    #[inline]
    fn load_fast(&self) -> [u64; 2] {
        [self.words[0].load(Acquire), self.words[1].load(Acquire)]
    }

    #[inline]
    fn compare_exchange(&self, current: [u64; 2], new: [u64; 2]) -> Result<(), [u64; 2]> {
        // SAFETY: 16-byte aligned (AtomicPair's alignment), valid, only
        // accessed atomically; the FFI checks supported() before any pair.
        unsafe { dwcas::compare_exchange(&self.words as *const _ as *mut u64, current, new) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A pair's cells (strict and limit records have the same width).
    pub(crate) fn cells() -> Vec<AtomicU64> {
        (0..WIDTH).map(|_| AtomicU64::new(0)).collect()
    }

    pub(crate) fn pair(cells: &[AtomicU64]) -> &AtomicPair {
        unsafe { AtomicPair::of_cells(cells.as_ptr()) }
    }

    fn add(step: i64) -> impl FnMut(&Current) -> Result<Change, &'static str> {
        move |c| {
            let value = c.value.checked_add(step).ok_or("overflow")?;
            Ok(Change::Write {
                value,
                expiry_ms: c.expiry_ms,
            })
        }
    }

    const NOW: fn() -> u64 = || 1_000;

    #[test]
    fn the_hardware_pair_swaps_both_words_or_none() {
        assert!(supported());
        let cells = cells();
        let p = pair(&cells);
        assert_eq!(p.load(), [0, 0]);
        assert_eq!(p.compare_exchange([0, 0], [5, 9]), Ok(()));
        assert_eq!(p.compare_exchange([5, 0], [6, 9]), Err([5, 9]));
        assert_eq!(p.compare_exchange([0, 9], [6, 9]), Err([5, 9]));
        assert_eq!(p.load(), [5, 9]);
        assert_eq!(p.load_fast(), [5, 9]);
    }

    #[test]
    fn updates_start_from_absent_and_refuse_without_changing() {
        let cells = cells();
        let p = pair(&cells);
        assert!(untouched(p));
        assert_eq!(update(p, NOW, add(3)).unwrap().value, 0);
        assert!(!untouched(p));
        assert_eq!(get(p, NOW).unwrap().value, 3);
        assert_eq!(
            update(p, NOW, add(i64::MAX)).unwrap_err(),
            Refused::Op("overflow")
        );
        assert_eq!(get(p, NOW).unwrap().value, 3);
        update(p, NOW, |_| Ok::<_, ()>(Change::Remove)).unwrap();
        assert!(!get(p, NOW).unwrap().live);
        assert!(!import(p, Some((7, 0))), "touched: no import");
    }

    #[test]
    fn an_expired_key_reads_absent_and_starts_again_from_zero() {
        let cells = cells();
        let p = pair(&cells);
        update(p, NOW, |c| {
            Ok::<_, ()>(Change::Write {
                value: 5,
                expiry_ms: expiry_after(c, false, 500, NOW),
            })
        })
        .unwrap();
        assert_eq!(get(p, || 1_499).unwrap().value, 5);
        let later = get(p, || 1_500).unwrap();
        assert!(!later.live);
        assert_eq!(later.value, 0);
        let seen = update(p, || 1_600, add(1)).unwrap();
        assert!(!seen.live);
        assert_eq!(get(p, || 1_600).unwrap().value, 1);
    }

    #[test]
    fn an_untouched_record_imports_once() {
        let cells = cells();
        let p = pair(&cells);
        assert!(import(p, Some((42, 0))));
        assert!(!import(p, Some((43, 0))));
        assert_eq!(get(p, NOW).unwrap().value, 42);
        let other = self::cells();
        let q = pair(&other);
        assert!(import(q, None));
        assert!(!untouched(q));
        assert!(!get(q, NOW).unwrap().live);
    }

    fn batches<'a>(
        control: &'a [AtomicU64],
        pid: u32,
        alive: &'a dyn Fn(u32) -> bool,
    ) -> Batches<'a, AtomicU64> {
        Batches {
            control,
            me: Holder { pid, instance: 1 },
            alive,
        }
    }

    /// A batch that adds 1 to each of `pairs`.
    fn add_one_to_each(
        batch: &Batches<'_, AtomicU64>,
        pairs: &[&AtomicPair],
        journal: &[AtomicU64],
    ) -> Result<(), Refused<&'static str>> {
        let (mut states, mut changes) = (Vec::new(), Vec::new());
        unsafe {
            batch.run(
                pairs,
                journal,
                NOW,
                |states, changes| {
                    for (state, change) in states.iter().zip(changes.iter_mut()) {
                        *change = add(1)(state)?;
                    }
                    Ok(())
                },
                &mut states,
                &mut changes,
            )
        }
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let (a, b) = (cells(), cells());
        let pairs = [pair(&a), pair(&b)];
        let control: Vec<AtomicU64> = (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect();
        let journal: Vec<AtomicU64> = (0..6).map(|_| AtomicU64::new(0)).collect();
        let alive = |_| true;
        let batch = batches(&control, 10, &alive);
        update(pairs[1], NOW, add(i64::MAX)).unwrap();
        let (mut states, mut changes) = (Vec::new(), Vec::new());
        let refused = add_one_to_each(&batch, &pairs, &journal);
        assert_eq!(refused, Err(Refused::Op("overflow")));
        assert!(!get(pairs[0], NOW).unwrap().live, "nothing written");
        assert_eq!(get(pairs[1], NOW).unwrap().value, i64::MAX);
        unsafe {
            batch
                .run(
                    &pairs,
                    &journal,
                    NOW,
                    |_, changes| {
                        changes[0] = Change::Write {
                            value: 1,
                            expiry_ms: 0,
                        };
                        changes[1] = Change::Remove;
                        Ok::<_, ()>(())
                    },
                    &mut states,
                    &mut changes,
                )
                .unwrap();
        }
        assert_eq!(states[1].value, i64::MAX);
        assert_eq!(get(pairs[0], NOW).unwrap().value, 1);
        assert!(!get(pairs[1], NOW).unwrap().live);
        assert_eq!(lock::holder(&control[C_LOCK]), None);
    }

    /// A batch killed after it decided is rolled forward by whoever takes
    /// the lock over; one killed before, back.
    #[test]
    fn a_dead_batch_is_finished_by_the_next() {
        for decided in [false, true] {
            let (a, b) = (cells(), cells());
            let pairs = [pair(&a), pair(&b)];
            let control: Vec<AtomicU64> = (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect();
            let journal: Vec<AtomicU64> = (0..6).map(|_| AtomicU64::new(0)).collect();
            update(pairs[0], NOW, add(5)).unwrap();
            // What a batch of pid 10 leaves when killed: the lock, the
            // journal, a frozen record (and one already written back).
            let alive = |pid| pid != 10;
            let dead = batches(&control, 10, &alive);
            lock::try_lock(&control[C_LOCK], dead.me, |_| true).unwrap();
            journal[0].store(pairs[0] as *const _ as u64, Relaxed);
            journal[3].store(pairs[1] as *const _ as u64, Relaxed);
            journal[1].store(6, Relaxed);
            journal[2].store(TOUCHED | PRESENT, Relaxed);
            journal[4].store(1, Relaxed);
            journal[5].store(TOUCHED | PRESENT, Relaxed);
            control[C_COUNT].store(2, Relaxed);
            control[C_JOURNAL].store(journal.as_ptr() as u64, Relaxed);
            control[C_STATE].store(if decided { COMMITTED } else { FREEZING }, Relaxed);
            let [v, m] = pairs[0].load();
            pairs[0].compare_exchange([v, m], [v, m | FROZEN]).unwrap();
            if decided {
                // The dead batch wrote this one back already; a single
                // update changed it since.
                pairs[1]
                    .compare_exchange([0, 0], [9, TOUCHED | PRESENT])
                    .unwrap();
            }
            assert_eq!(update(pairs[0], NOW, add(1)), Err(Refused::Busy));
            let helper = batches(&control, 11, &alive);
            assert!(unsafe { helper.help::<AtomicPair>() });
            assert_eq!(
                get(pairs[0], NOW).unwrap().value,
                if decided { 6 } else { 5 }
            );
            assert_eq!(get(pairs[1], NOW).unwrap().live, decided);
            if decided {
                assert_eq!(get(pairs[1], NOW).unwrap().value, 9, "left alone");
            }
            assert_eq!(lock::holder(&control[C_LOCK]), None);
            update(pairs[0], NOW, add(1)).unwrap();
        }
    }

    #[test]
    fn only_absent_or_expired_written_pairs_are_retired_and_gone_is_final() {
        let remove = |_: &Current| Ok::<_, ()>(Change::Remove);
        // Untouched (a worker is about to import), live: kept.
        let cells = cells();
        let p = pair(&cells);
        assert!(!retire(p, NOW));
        update(p, NOW, add(2)).unwrap();
        assert!(!retire(p, NOW));
        assert_eq!(get(p, NOW).unwrap().value, 2);
        // Frozen by a batch: kept.
        let [v, m] = p.load();
        p.compare_exchange([v, m], [v, m | FROZEN]).unwrap();
        update(p, NOW, remove).unwrap_err();
        assert!(!retire(p, NOW));
        p.compare_exchange([v, m | FROZEN], [v, m]).unwrap();
        // Deleted: retired, and from then on nothing lands in it.
        update(p, NOW, remove).unwrap();
        assert!(reclaimable(p.load(), NOW));
        assert!(retire(p, NOW));
        assert_eq!(p.load(), GONE);
        assert!(retire(p, NOW), "GONE stays GONE");
        assert_eq!(update(p, NOW, add(1)), Err(Refused::Gone(0)));
        assert_eq!(update(p, NOW, remove), Err(Refused::Gone(0)));
        assert!(!get(p, NOW).unwrap().live, "reads absent");
        assert!(!import(p, Some((7, 0))));
        assert_eq!(p.load(), GONE);
        // Expired: retired at its expiry, not a millisecond before.
        let cells = self::cells();
        let q = pair(&cells);
        update(q, NOW, |c| {
            Ok::<_, ()>(Change::Write {
                value: 9,
                expiry_ms: expiry_after(c, false, 500, NOW),
            })
        })
        .unwrap();
        assert!(!retire(q, || 1_499));
        assert!(retire(q, || 1_500));
        assert_eq!(q.load(), GONE);
    }

    #[test]
    fn a_batch_that_meets_a_removed_record_changes_nothing() {
        let (a, b, c) = (cells(), cells(), cells());
        let pairs = [pair(&a), pair(&b), pair(&c)];
        update(pairs[0], NOW, add(5)).unwrap();
        update(pairs[1], NOW, |_| Ok::<_, ()>(Change::Remove)).unwrap();
        assert!(retire(pairs[1], NOW));
        let control: Vec<AtomicU64> = (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect();
        let journal: Vec<AtomicU64> = (0..9).map(|_| AtomicU64::new(0)).collect();
        let alive = |_| true;
        let batch = batches(&control, 10, &alive);
        let ran = add_one_to_each(&batch, &pairs, &journal);
        assert_eq!(ran, Err(Refused::Gone(1)));
        assert_eq!(get(pairs[0], NOW).unwrap().value, 5, "unfrozen as it was");
        update(pairs[0], NOW, add(1)).unwrap();
        assert_eq!(pairs[1].load(), GONE);
        assert!(untouched(pairs[2]), "never frozen");
        assert_eq!(lock::holder(&control[C_LOCK]), None);
        assert_eq!(control[C_STATE].load(Relaxed), IDLE);
    }

    /// A dead batch's recovery leaves alone a record it had unfrozen and
    /// that was removed since (GONE carries FROZEN).
    #[test]
    fn recovery_leaves_a_removed_record_gone() {
        let a = cells();
        let p = pair(&a);
        let control: Vec<AtomicU64> = (0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect();
        let journal: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let alive = |pid| pid != 10;
        let dead = batches(&control, 10, &alive);
        lock::try_lock(&control[C_LOCK], dead.me, |_| true).unwrap();
        journal[0].store(p as *const _ as u64, Relaxed);
        journal[1].store(6, Relaxed);
        journal[2].store(TOUCHED | PRESENT, Relaxed);
        control[C_COUNT].store(1, Relaxed);
        control[C_JOURNAL].store(journal.as_ptr() as u64, Relaxed);
        control[C_STATE].store(COMMITTED, Relaxed);
        // Written back (absent), then removed.
        p.compare_exchange([0, 0], [0, TOUCHED]).unwrap();
        assert!(retire(p, NOW));
        let helper = batches(&control, 11, &alive);
        assert!(unsafe { helper.help::<AtomicPair>() });
        assert_eq!(p.load(), GONE);
    }

    /// Updaters add to a key's record while a deleter deletes it and
    /// removes its record (a new one takes its place, as a new look-up
    /// would make): every add is either in what a delete took or in the
    /// last record. An add that landed in a removed record would be lost.
    #[test]
    fn no_update_lands_in_a_removed_record() {
        const RECORDS: usize = 20_000;
        const ADDS: i64 = 30_000;
        let region: Arc<Vec<AtomicU64>> = Arc::new(
            (0..RECORDS * WIDTH as usize)
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
        // The index of the key's record now: the table's lookup.
        let current = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let record = |region: &Arc<Vec<AtomicU64>>, i: usize| {
            let w = WIDTH as usize;
            unsafe { AtomicPair::of_cells(region[i * w..].as_ptr()) as *const AtomicPair }
        };
        let updaters: Vec<_> = (0..3)
            .map(|_| {
                let (region, current) = (region.clone(), current.clone());
                std::thread::spawn(move || {
                    let mut gone = 0;
                    for n in 0..ADDS {
                        if n % 4 == 0 {
                            // Leaves the deleter room to find the key
                            // absent now and then.
                            std::thread::yield_now();
                        }
                        loop {
                            let i = current.load(Acquire);
                            let p = unsafe { &*record(&region, i) };
                            match update(p, NOW, add(1)) {
                                Ok(_) => break,
                                Err(Refused::Gone(_)) => gone += 1,
                                Err(e) => panic!("{:?}", e),
                            }
                        }
                    }
                    gone
                })
            })
            .collect();
        let deleter = {
            let (region, current) = (region.clone(), current.clone());
            std::thread::spawn(move || {
                let (mut taken, mut removed) = (0i64, 0);
                while removed + 1 < RECORDS && Arc::strong_count(&region) > 2 {
                    let i = current.load(Acquire);
                    let p = unsafe { &*record(&region, i) };
                    taken += update(p, NOW, |_| Ok::<_, ()>(Change::Remove))
                        .map_or(0, |state| state.value);
                    if retire(p, NOW) {
                        // The table's removal takes a while (its lock,
                        // the index): updates that come meanwhile must
                        // not land.
                        let until =
                            std::time::Instant::now() + std::time::Duration::from_micros(20);
                        while std::time::Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        removed += 1;
                        current.store(i + 1, Release);
                    }
                }
                (taken, removed)
            })
        };
        let gone: i32 = updaters.into_iter().map(|t| t.join().unwrap()).sum();
        let (taken, removed) = deleter.join().unwrap();
        let last = current.load(Acquire);
        let left = get(unsafe { &*record(&region, last) }, NOW).unwrap().value;
        assert!(removed > 10, "{} removed", removed);
        assert_eq!(taken + left, 3 * ADDS, "{} gone", gone);
    }

    #[test]
    fn threads_lose_no_step_and_batches_stay_atomic() {
        let region: Arc<Vec<AtomicU64>> = Arc::new((0..16).map(|_| AtomicU64::new(0)).collect());
        let control: Arc<Vec<AtomicU64>> =
            Arc::new((0..CONTROL_WIDTH).map(|_| AtomicU64::new(0)).collect());
        let journal: Arc<Vec<AtomicU64>> = Arc::new((0..6).map(|_| AtomicU64::new(0)).collect());
        const STEPS: i64 = 20_000;
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (region, control, journal) = (region.clone(), control.clone(), journal.clone());
                std::thread::spawn(move || {
                    let pairs = [pair(&region[0..3]), pair(&region[6..9])];
                    let alive = |_| true;
                    let batch = batches(&control, 100 + t, &alive);
                    let (mut states, mut changes) = (Vec::new(), Vec::new());
                    // Adds to a, to b, moves from a to b.
                    let mut done = [0i64; 3];
                    for i in 0..STEPS {
                        if t % 2 == 0 || i % 4 != 0 {
                            let which = (i % 2) as usize;
                            while update(pairs[which], NOW, add(1)) == Err(Refused::Busy) {}
                            done[which] += 1;
                            continue;
                        }
                        // Moves one from a to b: an add that landed
                        // between the move's read and its write would be
                        // lost, which the totals below would show.
                        loop {
                            let ran = unsafe {
                                batch.run(
                                    &pairs,
                                    &journal,
                                    NOW,
                                    |s, c| {
                                        c[0] = Change::Write {
                                            value: s[0].value - 1,
                                            expiry_ms: 0,
                                        };
                                        c[1] = Change::Write {
                                            value: s[1].value + 1,
                                            expiry_ms: 0,
                                        };
                                        Ok::<_, ()>(())
                                    },
                                    &mut states,
                                    &mut changes,
                                )
                            };
                            if ran.is_ok() {
                                break;
                            }
                        }
                        done[2] += 1;
                    }
                    done
                })
            })
            .collect();
        let mut done = [0i64; 3];
        for thread in threads {
            let one = thread.join().unwrap();
            for i in 0..3 {
                done[i] += one[i];
            }
        }
        let pairs = [pair(&region[0..3]), pair(&region[6..9])];
        let a = get(pairs[0], NOW).unwrap().value;
        let b = get(pairs[1], NOW).unwrap().value;
        assert!(done[2] > 0);
        assert_eq!(a, done[0] - done[2]);
        assert_eq!(b, done[1] + done[2]);
    }
}
