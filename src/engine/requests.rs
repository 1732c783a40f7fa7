//! The request counter's records in the engine (docs/engine.md, stage 3):
//! one per key, written by every worker without a lock, read by any.
//!
//! Cells:
//!
//! ```text
//! 0          total count (every request since the key was made)
//! 1          total latency sum, ms (f64 bits)
//! 2..2+E     total count per Prometheus edge (not cumulative; a latency
//!            above the last edge is in the count only); E edges, 11 by
//!            default (the layout's, see [`Layout::with_edges`])
//! 2+E        the roll lock (see super::lock)
//! 3+E..      `ring` window slots of SLOT_WORDS words each:
//!            stamp (window index + 1; 0 empty; ROLLING while zeroed),
//!            count, sum (f64 bits), max (f64 bits), the lines word
//!            (bit g: line g of the buckets has a count; see
//!            [`Requests::record`]), then the histogram's buckets, two u32
//!            counts per word
//! ```
//!
//! An engine too small to hold [`MIN_KEYS_WITH_HISTOGRAM`] records with
//! histograms (a dict of some 100k or less at the default three windows)
//! makes its request records without the buckets (see [`Layout`]): counts,
//! sums and maxima only, and no percentiles.
//!
//! A window's slot is `window % ring`. A writer whose slot holds its window
//! adds; one whose slot holds an older window rolls it (under the roll lock:
//! marks it ROLLING, zeroes it, stamps it) and adds; one whose slot holds a
//! newer window (its clock is behind another worker's by `ring` windows)
//! adds to the total only.

use std::hash::Hasher;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use siphasher::sip::SipHasher13;

use super::cell::{add_f64, load_f64};
use super::lock::{self, Holder};
use super::word::{prefetch, Word};
use crate::histogram::{
    bucket_of, bucket_value, last_rank_read, reported_ranks, Histogram, Summary, BUCKETS,
    MAX_EDGES, MAX_VALUE, PROMETHEUS_EDGES_MS,
};

/// The first byte of every request key in the table.
pub const KIND: u8 = b'r';

/// The engine-wide count of keys registered against `max_keys`: a record
/// of one cell under a key no request key has (request keys are the kind
/// byte and a key that [`is_request_key`] accepts).
pub const KEYS_KEY: &[u8] = b"r\0keys";

/// The engine-wide Prometheus edges of request records: a record of one
/// cell holding a fingerprint of them (see [`claim_edges`]), under a key
/// no request key has.
pub const EDGES_KEY: &[u8] = b"r\0edges";

const T_COUNT: usize = 0;
const T_SUM: usize = 1;
const T_EDGES: usize = 2;
/// Edges of the default layout.
const EDGES: usize = PROMETHEUS_EDGES_MS.len();

const S_STAMP: usize = 0;
const S_COUNT: usize = 1;
const S_SUM: usize = 2;
const S_MAX: usize = 3;
/// The slot's lines word: bit g set when the g-th cache line (64 bytes,
/// by address) of the slot's buckets had a count added in the slot's
/// window. A reader loads only those lines: a busy key fills a few of the
/// 25 (see [`Requests::record`], [`Requests::read_window`]).
const S_LINES: usize = 4;
const S_BUCKETS: usize = 5;
/// Words per cache line, the unit of the lines word.
const LINE_WORDS: usize = 8;

/// Words of bucket counts in a slot: two u32 counts per word. A count
/// would need 2^32 requests in one window and one bucket to carry into its
/// neighbour.
pub const BUCKET_WORDS: usize = (BUCKETS as usize + 1) / 2;

/// Words per window slot.
pub const SLOT_WORDS: usize = S_BUCKETS + BUCKET_WORDS;

/// The stamp of a slot being zeroed by a roll.
const ROLLING: u64 = u64::MAX;

/// The most window slots a record has (a report shows at most 64 previous
/// windows, see crate::stats).
pub const MAX_RING: usize = 65;

/// The fewest records with histograms an engine must hold for its request
/// records to have them.
pub const MIN_KEYS_WITH_HISTOGRAM: usize = 8;

/// The shape of an engine's request records: `ring` windows (the current
/// one and `previous`), with or without histogram buckets, and `edges`
/// Prometheus edges counted in the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    ring: usize,
    histogram: bool,
    edges: usize,
}

impl Layout {
    /// With the 11 default edges; None for a ring of 0 or past
    /// [`MAX_RING`].
    pub fn new(ring: usize, histogram: bool) -> Option<Layout> {
        Layout::with_edges(ring, histogram, EDGES)
    }

    /// With `edges` edges; None for a ring of 0 or past [`MAX_RING`], or
    /// edges other than 1 to [`MAX_EDGES`].
    pub fn with_edges(ring: usize, histogram: bool, edges: usize) -> Option<Layout> {
        if ring == 0 || ring > MAX_RING || edges == 0 || edges > MAX_EDGES {
            return None;
        }
        Some(Layout {
            ring,
            histogram,
            edges,
        })
    }

    /// The layout of an engine whose arena has `arena_words` words: with
    /// histograms when it holds [`MIN_KEYS_WITH_HISTOGRAM`] such records
    /// (of keys of up to 64 bytes). The same in every worker, for the
    /// engine's life.
    pub fn for_arena(ring: usize, edges: usize, arena_words: u64) -> Option<Layout> {
        let dense = Layout::with_edges(ring, true, edges)?;
        let record = u64::from(dense.width()) + 2 + 8;
        let histogram = arena_words >= MIN_KEYS_WITH_HISTOGRAM as u64 * record;
        Layout::with_edges(ring, histogram, edges)
    }

    pub fn edges(self) -> usize {
        self.edges
    }

    fn roll_lock(self) -> usize {
        T_EDGES + self.edges
    }

    fn header(self) -> usize {
        self.roll_lock() + 1
    }

    pub fn ring(self) -> usize {
        self.ring
    }

    pub fn has_histogram(self) -> bool {
        self.histogram
    }

    fn slot_words(self) -> usize {
        if self.histogram {
            SLOT_WORDS
        } else {
            // Without buckets, no lines word either.
            S_LINES
        }
    }

    /// A record's width, in cells.
    pub fn width(self) -> u32 {
        (self.header() + self.ring * self.slot_words()) as u32
    }
}

/// Whether a table key (kind byte included) is a request key, not the key
/// registry's count.
pub fn is_request_key(key: &[u8]) -> bool {
    key.first() == Some(&KIND) && key.get(1) != Some(&0)
}

/// What a recording did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// In its window and the total.
    Window,
    /// In the total only: its window's slot holds a newer window (a clock
    /// behind another worker's by the whole ring), or a live roller did not
    /// finish within the spins allowed.
    TotalOnly,
}

/// What recording needs from the process it runs in.
pub trait Roller {
    /// This process as a lock holder.
    fn me(&self) -> Holder;
    /// Whether a process exists.
    fn alive(&self, pid: u32) -> bool;
    /// One wait while another writer rolls the slot: a short spin, then
    /// yields of the CPU.
    fn pause(&self, spin: u32) {
        if spin < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    /// How many waits before giving up on a live roller. A roll is a few
    /// hundred stores: a roller still at it after 2000 was descheduled (or
    /// stopped); its writers count in the total and go on.
    fn spins(&self) -> u32 {
        2000
    }
}

/// Every request since the key was made, for Prometheus' counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Total {
    pub count: u64,
    pub sum: f64,
    /// Requests at or below each edge (cumulative).
    pub at_or_below: Vec<u64>,
}

/// A request record's cells, and its edges (milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Requests<'a, W: Word> {
    cells: &'a [W],
    layout: Layout,
    edges_ms: &'a [f64],
}

/// Where a slot's first bucket word lies in its cache line (0 to 7, by
/// address): bucket word `i` is in the slot's line `(i + lead) / 8`. The
/// same in every worker: the engine's memory is mapped page-aligned (by
/// address modulo a page, every worker sees a word where the others do).
#[inline(always)]
fn lead<W: Word>(slot: &[W]) -> usize {
    (&slot[S_BUCKETS] as *const W as usize / std::mem::size_of::<W>()) % LINE_WORDS
}

/// Adds `add` to bucket word `word` of `slot`, its line's bit in the lines
/// word set first (a load and a test when it is set already: on all but
/// a line's first request of a window). The bit before the count: a
/// reader that loads the bit and skips the line misses a count it may
/// miss (one being added), never one added before its read. A roll zeroes
/// the lines word with the buckets, before the new stamp.
#[inline(always)]
fn add_to_bucket<W: Word>(slot: &[W], word: usize, add: u64) {
    let bit = 1u64 << ((word + lead(slot)) / LINE_WORDS);
    let lines = &slot[S_LINES];
    let mut seen = lines.load(Relaxed);
    while seen & bit == 0 {
        match lines.compare_exchange(seen, seen | bit, Relaxed, Relaxed) {
            Ok(_) => break,
            Err(now) => seen = now,
        }
    }
    slot[S_BUCKETS + word].fetch_add(add, Relaxed);
}

/// The bucket words of a slot whose lines word is `lines`, ascending:
/// those of each line whose bit is set.
fn occupied_words(lines: u64, lead: usize) -> impl Iterator<Item = usize> {
    (0..u64::BITS as usize)
        .filter(move |&line| lines & (1 << line) != 0)
        .flat_map(move |line| line_words(line, lead))
}

/// The bucket words in line `line` of a slot whose first bucket word is
/// `lead` words into its cache line: the inverse of the bit
/// [`add_to_bucket`] sets.
fn line_words(line: usize, lead: usize) -> std::ops::Range<usize> {
    let start = (line * LINE_WORDS).saturating_sub(lead);
    let end = ((line + 1) * LINE_WORDS)
        .saturating_sub(lead)
        .min(BUCKET_WORDS);
    start..end
}

/// [`Summary::from_buckets`] of the bucket words `buckets` of a slot whose
/// lines word is `lines` (its first bucket word `lead` words into its
/// cache line), read from the marked lines, ascending, up to the last
/// rank looked for: the same summary, without an iterator of pairs.
fn summary_of_lines<W: Word>(
    count: u64,
    sum: f64,
    max: f64,
    mut lines: u64,
    lead: usize,
    buckets: &[W],
) -> Summary {
    if count == 0 {
        return Summary {
            count,
            sum,
            max,
            percentiles: Some([0.0; 3]),
        };
    }
    let ranks = reported_ranks(count);
    // Ranks at or past the count are the maximum; the others (ascending,
    // as the percentiles) are found in the buckets.
    let wanted = ranks.iter().filter(|&&rank| rank < count).count();
    let mut percentiles = [max; 3];
    let (mut found, mut seen) = (0, 0u64);
    'lines: while found < wanted && lines != 0 {
        let line = lines.trailing_zeros() as usize;
        lines &= lines - 1;
        for word in line_words(line, lead) {
            let pair = buckets[word].load(Acquire);
            if pair == 0 {
                continue;
            }
            for (half, n) in [(0, pair & 0xFFFF_FFFF), (1, pair >> 32)] {
                let bucket = (2 * word + half) as u16;
                if n == 0 || bucket >= BUCKETS {
                    continue;
                }
                // A foreign record's counts may not add up: never overflow.
                seen = seen.saturating_add(n);
                while found < wanted && seen >= ranks[found] {
                    percentiles[found] = bucket_value(bucket).min(max);
                    found += 1;
                }
                if found == wanted {
                    break 'lines;
                }
            }
        }
    }
    Summary {
        count,
        sum,
        max,
        percentiles: Some(percentiles),
    }
}

fn add_max<W: Word>(cell: &W, value: f64) {
    let mut current = cell.load(Relaxed);
    while value > f64::from_bits(current) {
        match cell.compare_exchange(current, value.to_bits(), Relaxed, Relaxed) {
            Ok(_) => return,
            Err(now) => current = now,
        }
    }
}

impl<'a, W: Word> Requests<'a, W> {
    /// With the default edges ([`PROMETHEUS_EDGES_MS`]); None when
    /// `cells` is not a record of `layout`, or `layout` has other edges.
    pub fn new(cells: &'a [W], layout: Layout) -> Option<Requests<'a, W>> {
        Requests::with_edges(cells, layout, &PROMETHEUS_EDGES_MS)
    }

    /// With edges `edges_ms` (ascending, milliseconds; see
    /// [`crate::histogram::edge_ms`]); None when `cells` is not a record of
    /// `layout` or `layout` has another number of edges.
    pub fn with_edges(
        cells: &'a [W],
        layout: Layout,
        edges_ms: &'a [f64],
    ) -> Option<Requests<'a, W>> {
        if cells.len() != layout.width() as usize || edges_ms.len() != layout.edges {
            return None;
        }
        Some(Requests {
            cells,
            layout,
            edges_ms,
        })
    }

    /// A record of `layout` over `cells` with edges `edges_ms`, from a
    /// caller that made `cells` exactly `layout.width()` long and
    /// `edges_ms` exactly `layout.edges()` long (the request path: its
    /// checks add up there).
    pub fn with_edges_sized(
        cells: &'a [W],
        layout: Layout,
        edges_ms: &'a [f64],
    ) -> Requests<'a, W> {
        debug_assert!(cells.len() == layout.width() as usize && edges_ms.len() == layout.edges);
        Requests {
            cells,
            layout,
            edges_ms,
        }
    }

    fn slot(&self, window: u64) -> &'a [W] {
        let words = self.layout.slot_words();
        let start = self.layout.header() + (window % self.layout.ring as u64) as usize * words;
        &self.cells[start..start + words]
    }

    /// Records one request of `latency_ms` (non-negative and finite: the
    /// Lua side checks; anything else counts as 0, above
    /// [`MAX_VALUE`] as that) in window `window` (the start time's index).
    pub fn record(&self, window: u64, latency_ms: f64, roller: &impl Roller) -> Recorded {
        // The usual case first, in two comparisons (NaN fails both).
        let value = if (0.0..=MAX_VALUE).contains(&latency_ms) {
            latency_ms
        } else if latency_ms > MAX_VALUE && latency_ms.is_finite() {
            MAX_VALUE
        } else {
            0.0
        };
        // The count before the edge's (Release): a total that sees the
        // edge's add sees the count's (see total()).
        self.cells[T_COUNT].fetch_add(1, Relaxed);
        add_f64(&self.cells[T_SUM], value);
        if let Some(edge) = self.edges_ms.iter().position(|&le| value <= le) {
            self.cells[T_EDGES + edge].fetch_add(1, Release);
        }

        // Stamps are window + 1 (0 is an empty slot); past u64::MAX - 1
        // would be ROLLING: such a window is in no clock.
        let want = window.saturating_add(1).min(ROLLING - 1);
        let slot = self.slot(window);
        let mut spins = 0;
        loop {
            let stamp = slot[S_STAMP].load(Acquire);
            if stamp == want {
                slot[S_COUNT].fetch_add(1, Relaxed);
                add_f64(&slot[S_SUM], value);
                add_max(&slot[S_MAX], value);
                if self.layout.histogram {
                    let bucket = bucket_of(value) as usize;
                    add_to_bucket(slot, bucket / 2, 1 << (32 * (bucket % 2)));
                }
                return Recorded::Window;
            }
            if stamp != ROLLING && stamp > want {
                return Recorded::TotalOnly;
            }
            if stamp == ROLLING && spins < roller.spins() {
                // Another writer is zeroing the slot: a few hundred stores.
                roller.pause(spins);
                spins += 1;
                continue;
            }
            match self.roll(slot, want, roller) {
                Ok(()) => continue,
                Err(()) if spins < roller.spins() => {
                    roller.pause(spins);
                    spins += 1;
                }
                Err(()) => return Recorded::TotalOnly,
            }
        }
    }

    /// Rolls `slot` on to stamp `want` unless someone did; Err when a live
    /// writer holds the roll lock. Inlined, as it was when the request path
    /// was its only caller: the request path's code stays as measured.
    #[inline(always)]
    fn roll(&self, slot: &[W], want: u64, roller: &impl Roller) -> Result<(), ()> {
        let word = &self.cells[self.layout.roll_lock()];
        let me = roller.me();
        lock::try_lock(word, me, |pid| roller.alive(pid)).map_err(|_| ())?;
        let stamp = slot[S_STAMP].load(Acquire);
        // A stamp still older (or ROLLING: a roller died mid-way) is ours
        // to roll; anything else another roller did before us.
        if stamp < want || stamp == ROLLING {
            slot[S_STAMP].store(ROLLING, Relaxed);
            // Release: a reader that sees a zero sees ROLLING after it.
            for cell in &slot[S_COUNT..] {
                cell.store(0, Release);
            }
            slot[S_STAMP].store(want, Release);
        }
        lock::unlock(word, me);
        Ok(())
    }

    /// Asks for the cache lines a report reads first (see
    /// [`super::word::prefetch`]): the total's cells and each window
    /// slot's stamp, count, sum and maximum. A record is some 4.9 KB: a
    /// walk that asks for the next records' lines while it reads one
    /// waits for one memory access at a time no more.
    pub fn prefetch(&self) {
        let header = self.layout.header();
        // Every line of the header (8 words a line), whatever its start.
        for cell in self.cells[..header].iter().step_by(8) {
            prefetch(cell);
        }
        prefetch(&self.cells[header - 1]);
        let words = self.layout.slot_words();
        for slot in self.cells[header..].chunks_exact(words) {
            prefetch(&slot[S_STAMP]);
            prefetch(&slot[words.min(S_BUCKETS) - 1]);
        }
    }

    /// Asks for the cache lines of the buckets that a report with
    /// percentiles reads next of each window slot (by its count and lines
    /// word: read, so best when [`prefetch`] asked for the slot's first
    /// words a while before): the lines with counts, up to the one of the
    /// last rank it looks for (each line with its bit set holds a request
    /// at least: rank r is within the first r).
    ///
    /// [`prefetch`]: Requests::prefetch
    pub fn prefetch_buckets(&self) {
        if !self.layout.histogram {
            return;
        }
        let header = self.layout.header();
        for slot in self.cells[header..].chunks_exact(SLOT_WORDS) {
            let lead = lead(slot);
            let mut lines = slot[S_LINES].load(Relaxed);
            let mut left = last_rank_read(slot[S_COUNT].load(Relaxed));
            while lines != 0 && left > 0 {
                left -= 1;
                let line = lines.trailing_zeros() as usize;
                lines &= lines - 1;
                if let Some(word) = slot[S_BUCKETS..].get(line_words(line, lead).start) {
                    prefetch(word);
                }
            }
        }
    }

    /// Window `window` as it is now, or None when its slot holds another
    /// window (or none yet). Without histograms, it has no percentiles.
    pub fn window(&self, window: u64) -> Option<Histogram> {
        self.read_window(
            window,
            |count, sum, max, lines, lead, buckets| {
                let pairs = occupied_words(lines, lead)
                    .map(|i| (i, buckets[i].load(Acquire)))
                    .filter(|&(_, word)| word != 0)
                    .flat_map(|(i, word)| {
                        let bucket = (2 * i) as u16;
                        [(bucket, word & 0xFFFF_FFFF), (bucket + 1, word >> 32)]
                    });
                Histogram::from_buckets(count, sum, max, pairs)
            },
            Histogram::without_buckets,
        )
    }

    /// The newest window any request was recorded in (by its slots'
    /// stamps), if any: when the key was last written, for idle expiry.
    pub fn last_window(&self) -> Option<u64> {
        let header = self.layout.header();
        (0..self.layout.ring)
            .map(|i| self.cells[header + i * self.layout.slot_words() + S_STAMP].load(Acquire))
            .filter(|&stamp| stamp != 0 && stamp != ROLLING)
            .max()
            .map(|stamp| stamp - 1)
    }

    /// The total count: every request since the key was made.
    pub fn count(&self) -> u64 {
        self.cells[T_COUNT].load(Acquire)
    }

    /// Adds everything `from` (a record of the same layout, removed from
    /// the index: no writer adds to it any more but one in flight) counted
    /// into this record: its total, and each of its windows into this
    /// record's slot of that window (rolled on to it if older; a window
    /// this record's ring has passed is in the total only). What an
    /// eviction folds into the overflow key, so that totals stay exact.
    /// Never inlined: it stays out of the request path's code.
    #[inline(never)]
    pub fn fold(&self, from: &Requests<'_, W>, roller: &impl Roller) {
        if from.layout.width() != self.layout.width() {
            return;
        }
        self.cells[T_COUNT].fetch_add(from.cells[T_COUNT].load(Acquire), Relaxed);
        add_f64(&self.cells[T_SUM], load_f64(&from.cells[T_SUM]));
        for edge in 0..self.layout.edges {
            let n = from.cells[T_EDGES + edge].load(Acquire);
            self.cells[T_EDGES + edge].fetch_add(n, Release);
        }
        let header = self.layout.header();
        let words = self.layout.slot_words();
        for i in 0..self.layout.ring {
            let theirs = &from.cells[header + i * words..header + (i + 1) * words];
            let stamp = theirs[S_STAMP].load(Acquire);
            if stamp == 0 || stamp == ROLLING {
                continue;
            }
            let ours = self.slot(stamp - 1);
            if !self.stamped(ours, stamp, roller) {
                continue;
            }
            ours[S_COUNT].fetch_add(theirs[S_COUNT].load(Relaxed), Relaxed);
            add_f64(&ours[S_SUM], load_f64(&theirs[S_SUM]));
            add_max(&ours[S_MAX], load_f64(&theirs[S_MAX]));
            if !self.layout.histogram {
                continue;
            }
            // Every word (the records' lines differ by address): a fold is
            // rare.
            for (word, pair) in theirs[S_BUCKETS..].iter().enumerate() {
                // Two u32 halves: each sum stays below 2^32 as recording's.
                let pair = pair.load(Relaxed);
                if pair != 0 {
                    add_to_bucket(ours, word, pair);
                }
            }
        }
    }

    /// Whether `slot` holds stamp `want` (rolled on to it when older) so
    /// that a fold may add to it: false when it holds a newer window, or a
    /// live roller kept it past the spins allowed.
    fn stamped(&self, slot: &[W], want: u64, roller: &impl Roller) -> bool {
        let mut spins = 0;
        loop {
            let stamp = slot[S_STAMP].load(Acquire);
            if stamp == want {
                return true;
            }
            if stamp != ROLLING && stamp > want {
                return false;
            }
            let rolled = stamp != ROLLING && self.roll(slot, want, roller).is_ok();
            if !rolled {
                if spins >= roller.spins() {
                    return false;
                }
                roller.pause(spins);
                spins += 1;
            }
        }
    }

    /// What a report shows of window `window`, as [`Summary::of`] the
    /// [`Requests::window`], read without building the histogram: the
    /// marked lines' words in one loop that ends at the last rank looked
    /// for (as [`Summary::from_buckets`], whose iterator of pairs cost a
    /// scrape of busy keys more than the loads).
    pub fn window_summary(&self, window: u64) -> Option<Summary> {
        self.read_window(window, summary_of_lines, Summary::without_buckets)
    }

    /// What a report without percentiles shows of window `window`: its
    /// count, sum and maximum, as [`Summary::without_buckets`], read
    /// without its buckets.
    pub fn window_counts(&self, window: u64) -> Option<Summary> {
        self.read_window(
            window,
            |count, sum, max, _, _, _| Summary::without_buckets(count, sum, max),
            Summary::without_buckets,
        )
    }

    /// Reads window `window` with `with_buckets` (count, sum, max, the
    /// lines word, where the first bucket word lies in its line, the
    /// bucket words: read the words of the marked lines, see
    /// [`occupied_words`]) or, kept without histograms, `without_buckets`;
    /// None when its slot holds another window.
    fn read_window<T>(
        &self,
        window: u64,
        with_buckets: impl FnOnce(u64, f64, f64, u64, usize, &[W]) -> T,
        without_buckets: impl FnOnce(u64, f64, f64) -> T,
    ) -> Option<T> {
        let want = window.saturating_add(1).min(ROLLING - 1);
        let slot = self.slot(window);
        if slot[S_STAMP].load(Acquire) != want {
            return None;
        }
        // Acquire: a cell zeroed by a roll (a Release store after the
        // ROLLING mark) makes the stamp's second look below see the roll.
        let count = slot[S_COUNT].load(Acquire);
        let sum = f64::from_bits(slot[S_SUM].load(Acquire));
        let max = f64::from_bits(slot[S_MAX].load(Acquire));
        let read = if self.layout.histogram {
            // Straight from the words of the lines that have counts (a
            // busy key fills a few of 25): no buffer per window. A line
            // whose bit is set after this load has only counts added
            // meanwhile.
            let lines = slot[S_LINES].load(Acquire);
            with_buckets(count, sum, max, lines, lead(slot), &slot[S_BUCKETS..])
        } else {
            without_buckets(count, sum, max)
        };
        // Rolled while read: the window is gone.
        if slot[S_STAMP].load(Relaxed) != want {
            return None;
        }
        Some(read)
    }

    /// Every request since the key was made: a consistent snapshot for
    /// Prometheus, whose histogram must never count more requests at or
    /// below an edge than in all (`+Inf`, the count). record() adds to the
    /// count first and to its edge after (Release); this reads the edges
    /// first (Acquire) and the count after, so every request seen at an
    /// edge is in the count read. The sum, read last, may hold requests
    /// under way that the count does not. Each value is one 64-bit load:
    /// none is torn.
    pub fn total(&self) -> Total {
        let mut at_or_below = Vec::new();
        let (count, sum) = self.total_into(&mut at_or_below);
        Total {
            count,
            sum,
            at_or_below,
        }
    }

    /// [`Requests::total`] into `at_or_below` (cleared first, then one
    /// count per edge), no allocation once it has room: the count and the
    /// sum.
    pub fn total_into(&self, at_or_below: &mut Vec<u64>) -> (u64, f64) {
        at_or_below.clear();
        let mut below = 0u64;
        for cell in &self.cells[T_EDGES..T_EDGES + self.layout.edges] {
            below = below.saturating_add(cell.load(Acquire));
            at_or_below.push(below);
        }
        (
            self.cells[T_COUNT].load(Relaxed),
            load_f64(&self.cells[T_SUM]),
        )
    }

    /// Whether a request was ever recorded (the count read alone).
    pub fn recorded(&self) -> bool {
        self.cells[T_COUNT].load(Relaxed) > 0
    }
}

/// A fingerprint of Prometheus edges (their bits, in order), never 0.
fn edges_fingerprint(edges: &[f64]) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(0x6564_6765, 0x7265_7175);
    for edge in edges {
        hasher.write_u64(edge.to_bits());
    }
    hasher.write_usize(edges.len());
    hasher.finish() | 1
}

/// Makes `edges` the engine's request edges in `cell` (the one cell of the
/// [`EDGES_KEY`] record) when it has none yet, in one compare-and-swap
/// (the first caller wins): true when they are the engine's, false when
/// the engine has others. A record's width tells its number of edges, not
/// which: every request counter of an engine must count at the same ones.
pub fn claim_edges<W: Word>(cell: &W, edges: &[f64]) -> bool {
    let mine = edges_fingerprint(edges);
    match cell.compare_exchange(0, mine, Relaxed, Relaxed) {
        Ok(_) => true,
        Err(theirs) => theirs == mine,
    }
}

/// Takes a place for a new key in the registry count `keys` (the one cell
/// of the [`KEYS_KEY`] record): false when `max` are taken.
pub fn register<W: Word>(keys: &W, max: u64) -> bool {
    let mut current = keys.load(Relaxed);
    loop {
        if current >= max {
            return false;
        }
        match keys.compare_exchange(current, current + 1, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(now) => current = now,
        }
    }
}

/// Gives back a place taken by [`register`] (the key was made by another
/// worker meanwhile, or could not be made).
pub fn unregister<W: Word>(keys: &W) {
    keys.fetch_add(u64::MAX, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    struct Here;

    impl Roller for Here {
        fn me(&self) -> Holder {
            Holder {
                pid: std::process::id(),
                instance: 1,
            }
        }
        fn alive(&self, pid: u32) -> bool {
            pid == std::process::id()
        }
        fn pause(&self, _: u32) {
            std::thread::yield_now();
        }
        fn spins(&self) -> u32 {
            100_000
        }
    }

    fn dense(ring: usize) -> Layout {
        Layout::new(ring, true).unwrap()
    }

    fn cells(ring: usize) -> Vec<AtomicU64> {
        (0..dense(ring).width())
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    #[test]
    fn the_last_window_is_the_newest_stamped() {
        let cells = cells(3);
        let r = Requests::new(&cells, dense(3)).unwrap();
        assert_eq!(r.last_window(), None);
        r.record(7, 1.0, &Here);
        assert_eq!(r.last_window(), Some(7));
        r.record(9, 1.0, &Here);
        // A request of an older window leaves the newest as it is.
        r.record(8, 1.0, &Here);
        assert_eq!(r.last_window(), Some(9));
        r.record(13, 1.0, &Here);
        assert_eq!(r.last_window(), Some(13));
    }

    /// The lines word of `r`'s slot of `window`.
    fn lines_of(r: &Requests<'_, AtomicU64>, window: u64) -> u64 {
        r.slot(window)[S_LINES].load(Relaxed)
    }

    /// The bit of the line of the bucket of `ms` in `r`'s slot of `window`.
    fn line_bit(r: &Requests<'_, AtomicU64>, window: u64, ms: f64) -> u64 {
        1 << ((bucket_of(ms) as usize / 2 + lead(r.slot(window))) / LINE_WORDS)
    }

    #[test]
    fn a_window_is_read_from_the_lines_its_requests_marked() {
        let cells = cells(3);
        let r = Requests::new(&cells, dense(3)).unwrap();
        let latencies = [0.0, 0.2, 1.1, 1.15, 4.0, 12.0, 30.0, 800.0, 5000.0, 2e6];
        let mut expected = Histogram::new();
        let mut bits = 0;
        for ms in latencies {
            r.record(10, ms, &Here);
            expected.record(ms);
            bits |= line_bit(&r, 10, ms);
        }
        assert_eq!(lines_of(&r, 10), bits);
        assert_eq!(r.window(10).unwrap(), expected);
        // A count in a line whose bit is not set is not read (none is
        // there but one added after the reader's load of the lines word).
        let unmarked = (0..BUCKET_WORDS)
            .find(|&word| bits & (1 << ((word + lead(r.slot(10))) / LINE_WORDS)) == 0)
            .unwrap();
        r.slot(10)[S_BUCKETS + unmarked].fetch_add(5, Relaxed);
        assert_eq!(r.window(10).unwrap(), expected);
        assert_eq!(r.window_summary(10), Some(Summary::of(&expected)));
        // A roll zeroes the lines word with the buckets.
        r.record(13, 2.0, &Here);
        assert_eq!(lines_of(&r, 13), line_bit(&r, 13, 2.0));
        let mut two = Histogram::new();
        two.record(2.0);
        assert_eq!(r.window(13).unwrap(), two);
    }

    #[test]
    fn a_window_s_summary_is_its_histogram_s() {
        // Slots filled at random, as no request path fills them: any
        // words, lines words that mark them or not, counts that do not
        // add up (a foreign or torn record), the bucket past the last.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Two records: their slots' first bucket words lie at two places
        // in their cache lines.
        for ring in [3, 2] {
            let cells = cells(ring);
            let r = Requests::new(&cells, dense(ring)).unwrap();
            for case in 0..3000 {
                r.record(9, 1.0, &Here);
                let slot = r.slot(9);
                let filled = 1 + next() % 12;
                let mut sum = 0u64;
                for word in &slot[S_BUCKETS..] {
                    word.store(0, Relaxed);
                }
                for _ in 0..filled {
                    // The last word (its high half past the last
                    // bucket) at times.
                    let word = match next() % 8 {
                        0 => BUCKET_WORDS - 1,
                        _ => (next() % BUCKET_WORDS as u64) as usize,
                    };
                    let n = next() % 5 + (next() % 3) * 1000;
                    let add = if next() % 2 == 0 { n } else { n << 32 };
                    slot[S_BUCKETS + word].fetch_add(add, Relaxed);
                    sum += n;
                }
                let marks = (0..BUCKET_WORDS)
                    .filter(|&w| slot[S_BUCKETS + w].load(Relaxed) != 0)
                    .fold(0, |bits, w| bits | 1 << ((w + lead(slot)) / LINE_WORDS));
                let lines = match case % 3 {
                    0 => marks,
                    1 => marks & next(),
                    _ => next() & ((1 << 26) - 1),
                };
                slot[S_LINES].store(lines, Relaxed);
                let count = match case % 4 {
                    0 => sum,
                    1 => sum / 2,
                    2 => sum + 3,
                    _ => case % 3,
                };
                slot[S_COUNT].store(count, Relaxed);
                // Past the last bucket's value at times (2^21 ms).
                let max = (next() % 5000) as f64 * if case % 5 == 0 { 1e4 } else { 1.0 };
                slot[S_MAX].store(max.to_bits(), Relaxed);
                let histogram = r.window(9).unwrap();
                assert_eq!(
                    r.window_summary(9),
                    Some(Summary::of(&histogram)),
                    "case {}",
                    case
                );
            }
        }
    }

    #[test]
    fn bad_latencies_count_as_0_and_huge_ones_as_the_largest() {
        let cells = cells(1);
        let r = Requests::new(&cells, dense(1)).unwrap();
        for ms in [f64::NAN, -3.0, f64::INFINITY, f64::NEG_INFINITY, 2e12, 5.0] {
            r.record(4, ms, &Here);
        }
        let w = r.window(4).unwrap();
        assert_eq!((w.count, w.sum, w.max), (6, MAX_VALUE + 5.0, MAX_VALUE));
        assert_eq!(w.percentile(0.5), 0.0);
        assert_eq!(r.total().sum, MAX_VALUE + 5.0);
    }

    #[test]
    fn a_fold_marks_the_lines_of_what_it_adds() {
        let (a, b) = (cells(3), cells(3));
        let from = Requests::new(&a, dense(3)).unwrap();
        let into = Requests::new(&b, dense(3)).unwrap();
        let mut expected = Histogram::new();
        for ms in [1.1, 4.0, 12.0, 30.0, 90.0, 250.0, 800.0] {
            from.record(21, ms, &Here);
            expected.record(ms);
        }
        into.record(21, 30.0, &Here);
        expected.record(30.0);
        into.fold(&from, &Here);
        assert_eq!(into.window(21).unwrap(), expected);
        assert_eq!(into.total().count, 8);
    }

    #[test]
    fn a_window_holds_its_requests_and_the_total_all() {
        let cells = cells(3);
        let r = Requests::new(&cells, dense(3)).unwrap();
        for ms in [1.0, 4.0, 30.0] {
            assert_eq!(r.record(100, ms, &Here), Recorded::Window);
        }
        let w = r.window(100).unwrap();
        assert_eq!((w.count, w.sum, w.max), (3, 35.0, 30.0));
        assert!((w.percentile(0.5) - 4.0).abs() / 4.0 < 0.032);
        assert_eq!(r.window(101), None);
        assert_eq!(r.window(97), None, "same slot, another window");
        // Windows roll on: 103 takes 100's slot.
        assert_eq!(r.record(103, 2.0, &Here), Recorded::Window);
        assert_eq!(r.window(100), None);
        let w = r.window(103).unwrap();
        assert_eq!((w.count, w.sum, w.max), (1, 2.0, 2.0));
        // A request of a window older than its slot's is in the total only.
        assert_eq!(r.record(100, 7.0, &Here), Recorded::TotalOnly);
        let total = r.total();
        assert_eq!((total.count, total.sum), (5, 44.0));
        // Edges 5, 10, 25, 50 ms...: 1, 2, 4 at or below 5; 30 at 50.
        assert_eq!(total.at_or_below[0], 3);
        assert_eq!(total.at_or_below[2], 4);
        assert_eq!(total.at_or_below[3], 5);
    }

    #[test]
    fn percentiles_stay_within_5_percent() {
        let cells = cells(1);
        let r = Requests::new(&cells, dense(1)).unwrap();
        let mut values: Vec<f64> = (1..=5000).map(|i| f64::from(i) * 0.37).collect();
        for &v in &values {
            r.record(7, v, &Here);
        }
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let w = r.window(7).unwrap();
        for q in [0.5, 0.9, 0.99] {
            let exact = values[((q * values.len() as f64).ceil() as usize) - 1];
            let got = w.percentile(q);
            assert!(
                (got - exact).abs() / exact < 0.05,
                "p{} {} {}",
                q,
                got,
                exact
            );
        }
        assert_eq!(w.max, 1850.0);
    }

    #[test]
    fn bad_rings_are_refused() {
        let c = cells(2);
        assert!(Requests::new(&c, dense(3)).is_none());
        assert!(Layout::new(0, true).is_none());
        assert!(Layout::new(MAX_RING + 1, true).is_none());
        assert!(Requests::new(&c, dense(2)).is_some());
        assert!(Requests::new(&c, Layout::new(2, false).unwrap()).is_none());
    }

    #[test]
    fn a_roll_left_by_a_dead_writer_is_finished() {
        let cells = cells(2);
        let r = Requests::new(&cells, dense(2)).unwrap();
        r.record(4, 1.0, &Here);
        // A writer (pid 1 is never us) died holding the lock mid-roll.
        let dead = Holder {
            pid: u32::MAX - 1,
            instance: 3,
        };
        let layout = dense(2);
        lock::try_lock(&cells[layout.roll_lock()], dead, |_| true).unwrap();
        cells[layout.header()].store(ROLLING, Relaxed);
        assert_eq!(r.record(6, 2.0, &Here), Recorded::Window);
        assert_eq!(r.window(6).unwrap().count, 1);
        assert_eq!(lock::holder(&cells[layout.roll_lock()]), None);
    }

    #[test]
    fn threads_rolling_the_same_slots_lose_no_request() {
        let cells: Arc<Vec<AtomicU64>> = Arc::new(cells(3));
        let r = Requests::new(&cells, dense(3)).unwrap();
        for window in 0..3 {
            r.record(window, 1.0, &Here);
        }
        // Four threads take windows 3, 4, 5 into the slots of 0, 1, 2: each
        // slot is rolled once, whoever comes first.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cells = Arc::clone(&cells);
                std::thread::spawn(move || {
                    let r = Requests::new(&cells, dense(3)).unwrap();
                    for i in 0..30_000u64 {
                        assert_eq!(r.record(3 + i / 10_000, 2.0, &Here), Recorded::Window);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for window in 3..6 {
            let w = r.window(window).unwrap();
            assert_eq!((w.count, w.sum, w.max), (40_000, 80_000.0, 2.0));
        }
        assert_eq!(r.window(0), None);
        assert_eq!(r.total().count, 120_003);
    }

    #[test]
    fn a_total_read_while_written_never_has_more_below_an_edge_than_its_count() {
        let cells: Arc<Vec<AtomicU64>> = Arc::new(cells(1));
        let stop = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let (cells, stop) = (Arc::clone(&cells), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let r = Requests::new(&cells, dense(1)).unwrap();
                    let mut i = 0u64;
                    while stop.load(Relaxed) == 0 {
                        // Every edge, and past the last one.
                        r.record(0, ((i * 7 + t) % 12_000) as f64, &Here);
                        i += 1;
                    }
                })
            })
            .collect();
        let r = Requests::new(&cells, dense(1)).unwrap();
        // The reads must overlap the writes: on a busy machine the writer
        // threads may not have run yet.
        while r.total().count == 0 {
            std::thread::yield_now();
        }
        for _ in 0..300_000 {
            let total = r.total();
            let below = total.at_or_below;
            assert!(
                below.windows(2).all(|w| w[0] <= w[1]),
                "not cumulative: {:?}",
                below
            );
            assert!(
                below[EDGES - 1] <= total.count,
                "{} at or below the last edge, count {}",
                below[EDGES - 1],
                total.count
            );
        }
        stop.store(1, Relaxed);
        for writer in writers {
            writer.join().unwrap();
        }
    }

    #[test]
    fn a_small_engine_keeps_no_histograms() {
        let record = u64::from(dense(3).width()) + 10;
        let small = Layout::for_arena(3, EDGES, 8 * record - 1).unwrap();
        assert!(!small.has_histogram());
        assert!(Layout::for_arena(3, EDGES, 8 * record)
            .unwrap()
            .has_histogram());
        assert_eq!(small.width(), 14 + 3 * 4);
        let cells: Vec<AtomicU64> = (0..small.width()).map(|_| AtomicU64::new(0)).collect();
        let r = Requests::new(&cells, small).unwrap();
        r.record(5, 3.0, &Here);
        r.record(5, 9.0, &Here);
        let w = r.window(5).unwrap();
        assert_eq!((w.count, w.sum, w.max), (2, 12.0, 9.0));
        assert!(!w.has_buckets());
        assert_eq!(r.total().count, 2);
    }

    #[test]
    fn the_first_edges_claimed_are_the_engine_s() {
        let cell = AtomicU64::new(0);
        assert!(claim_edges(&cell, &[0.1, 1.0]));
        assert!(claim_edges(&cell, &[0.1, 1.0]));
        assert!(!claim_edges(&cell, &[0.1, 2.0]));
        assert!(!claim_edges(&cell, &[0.1]));
        assert!(!claim_edges(&cell, &[0.1, 1.0, 2.0]));
        assert_ne!(cell.load(Relaxed), 0);
    }

    #[test]
    fn a_request_on_an_edge_counts_at_or_below_it() {
        use crate::histogram::edge_ms;
        let edges_s = [0.001, 0.3, 7.0];
        let edges_ms: Vec<f64> = edges_s.iter().map(|&e| edge_ms(e)).collect();
        let layout = Layout::with_edges(2, true, 3).unwrap();
        assert_eq!(layout.width(), dense(2).width() - 8);
        let cells: Vec<AtomicU64> = (0..layout.width()).map(|_| AtomicU64::new(0)).collect();
        assert!(Requests::new(&cells, layout).is_none(), "11 default edges");
        assert!(Requests::with_edges(&cells, layout, &edges_ms[..2]).is_none());
        let r = Requests::with_edges(&cells, layout, &edges_ms).unwrap();
        // Latencies as the Lua side makes them: seconds times 1000.
        for s in [0.001, 0.3, 0.30000000000000004, 7.0, 7.5] {
            r.record(1, s * 1000.0, &Here);
        }
        let total = r.total();
        assert_eq!(total.at_or_below, vec![1, 2, 4]);
        assert_eq!(total.count, 5);
        // docs/request-counter.md's formula: 3 + E + ring x 198 cells.
        for e in [1, 3, 11, MAX_EDGES] {
            let width = Layout::with_edges(3, true, e).unwrap().width() as usize;
            assert_eq!(width, 3 + e + 3 * 198);
            let bare = Layout::with_edges(3, false, e).unwrap().width() as usize;
            assert_eq!(bare, 3 + e + 3 * 4);
        }
        assert!(Layout::with_edges(2, true, 0).is_none());
        assert!(Layout::with_edges(2, true, MAX_EDGES + 1).is_none());
    }

    #[test]
    fn the_registry_holds_at_most_max() {
        let keys = AtomicU64::new(0);
        assert!(register(&keys, 2));
        assert!(register(&keys, 2));
        assert!(!register(&keys, 2));
        unregister(&keys);
        assert!(register(&keys, 2));
        assert_eq!(keys.load(Relaxed), 2);
    }
}
