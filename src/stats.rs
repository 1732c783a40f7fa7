//! Renders request records read from the shared engine: the JSON of
//! greencheek's request counter (with percentiles added) through
//! `serde_json`, and the Prometheus text exposition format.
//!
//! The engine's walk ([`crate::ffi_engine`]) hands the records over key by
//! key; rendering, escaping and the arithmetic happen here.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::engine::heavy::Figures;
use crate::engine::requests::{Layout, Total};
use crate::error::Error;
use crate::histogram::{bucket_of, bucket_value, check_edges, Summary, BUCKETS, DEFAULT_EDGES_S};

/// The most previous windows a report may show.
pub const MAX_PREVIOUS_WINDOWS: usize = 64;

/// The latest time a report accepts (epoch seconds, some 30 million years
/// from now): far past any clock, small enough for exact window arithmetic.
pub const MAX_NOW: f64 = 1e15;

/// What the report says about the key registry.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub tracked: u64,
    pub max_keys: u64,
    pub overflow_key: String,
    /// The engine's bytes in records (free ones included) and its size.
    pub engine: Option<EngineMemory>,
    /// What the admission past `max_keys` did (docs/engine.md).
    pub admission: Option<Admission>,
}

/// The admission past `max_keys`, shown with the key info: the flood
/// refused, the keys admitted in place of others, and each admitted key's
/// error bound (requests it may have had under the overflow key before).
#[derive(Debug, Clone, Default)]
pub struct Admission {
    pub figures: Figures,
    /// Admitted keys and their error bounds, in key order.
    pub errors: Vec<(String, u64)>,
}

/// The engine's memory, shown with the key info.
#[derive(Debug, Clone, Copy)]
pub struct EngineMemory {
    pub used_bytes: u64,
    pub bytes: u64,
}

/// A walk of the engine's records in several steps: first a scan of the
/// index for the records published (in steps too: its size is the dict's,
/// not the keys'), then the records, in the order they were made, read
/// [`Walk::take`] at a time by the engine's walk
/// ([`crate::ffi_engine::rc_requests_report_walk`]). A record removed
/// meanwhile stays readable (its space is reused no sooner than 10 s
/// later, for a record of the same size), so the offsets stay valid; a key
/// made or removed during the scan may or may not be in the report.
#[derive(Debug)]
pub struct Walk {
    /// The engine walked (its address), checked at every step.
    pub engine: usize,
    pub layout: Layout,
    /// The layout's edges, milliseconds.
    pub edges_ms: Vec<f64>,
    /// The current window's index.
    pub current: u64,
    /// Index slots: all, and scanned so far.
    slots: usize,
    scanned: usize,
    offsets: Vec<u32>,
    next: usize,
    /// The table's records mark taken before the scan (see
    /// [`crate::engine::table::Table::records_mark`]), for the engine to
    /// keep the offsets found with it.
    pub mark: Option<[u64; 2]>,
}

impl Walk {
    pub fn new(
        engine: usize,
        layout: Layout,
        edges_ms: Vec<f64>,
        current: u64,
        slots: usize,
    ) -> Walk {
        Walk {
            engine,
            layout,
            edges_ms,
            current,
            slots,
            scanned: 0,
            offsets: Vec::new(),
            next: 0,
            mark: None,
        }
    }

    /// Takes `offsets` (sorted: a scan's, from the records as they are)
    /// as the scan's: nothing is left to scan.
    pub fn scanned_as(&mut self, offsets: &[u32]) {
        self.offsets.clear();
        self.offsets.extend_from_slice(offsets);
        self.scanned = self.slots;
    }

    /// Copies the offsets a finished scan found into `into`.
    pub fn offsets_into(&self, into: &mut Vec<u32>) {
        into.clear();
        into.extend_from_slice(&self.offsets);
    }

    /// Scans the next `max` index slots (at least one): `fill` appends
    /// the offsets of the records in that range of slots. Once all are
    /// scanned the offsets are sorted: records are read in arena order.
    pub fn scan(&mut self, max: usize, fill: impl FnOnce(Range<usize>, &mut Vec<u32>)) {
        let start = self.scanned;
        self.scanned = self.slots.min(start.saturating_add(max.max(1)));
        fill(start..self.scanned, &mut self.offsets);
        if self.scanned() {
            self.offsets.sort_unstable();
        }
    }

    pub fn scanned(&self) -> bool {
        self.scanned >= self.slots
    }

    /// The next `max` offsets (at least one), empty once all were taken.
    pub fn take(&mut self, max: usize) -> Vec<u32> {
        let end = self.offsets.len().min(self.next.saturating_add(max.max(1)));
        let taken = self.offsets[self.next..end].to_vec();
        self.next = end;
        taken
    }

    pub fn done(&self) -> bool {
        self.scanned() && self.next >= self.offsets.len()
    }
}

/// The text a report is being rendered to.
#[derive(Debug, Clone)]
enum Format {
    Json,
    /// The dict's name escaped as a label, the edges' `le` labels.
    Prometheus {
        dict: Vec<u8>,
        edges: Vec<Vec<u8>>,
        window: Vec<u8>,
    },
}

/// Where a rendering in several steps stands: its format, the section
/// being written (Prometheus has three, each over every key) and the
/// position in key order of the next key to write in it.
#[derive(Debug)]
struct Rendering {
    format: Format,
    section: usize,
    next: usize,
    /// The text's bytes a key takes in all sections, at most about.
    per_key: usize,
}

/// One key of a report: where its text is in `Report::key_text`, its
/// total's count and sum (the rest of each key's figures are in flat
/// vectors of the report, by the key's index).
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: (usize, usize),
    count: u64,
    sum: f64,
}

/// One report being put together: keys are added (in any order, a few at
/// a time if need be), then the text is rendered (in steps of a few keys
/// if need be), by key. Every key's figures sit in a few flat vectors (no
/// allocation per key); the keys are sorted once, when rendering begins.
#[derive(Debug)]
pub struct Report {
    window: u64,
    now: f64,
    previous: usize,
    /// The Prometheus edges, seconds.
    edges: Vec<f64>,
    /// Every key's figures, the keys' order and the text.
    buf: Buffers,
    /// The runs of `buf.sorted`: their ranges; `run_start` the first
    /// entry not in a run yet.
    runs: Vec<(usize, usize)>,
    run_start: usize,
    /// The runs being merged: a heap of (next position, end) in `sorted`,
    /// by the key at the position. A scrape in steps merges a step's keys
    /// at a time: no sort of every key at once stalls the worker.
    heap: Vec<(usize, usize)>,
    /// Whether `buf.order` has every entry.
    merged: bool,
    /// Whether the windows' percentiles are read (false: a report for
    /// Prometheus, which shows none; see [`Report::without_percentiles`]).
    percentiles: bool,
    key_info: Option<KeyInfo>,
    /// Admitted keys' error bounds read so far, for the key info.
    admission_errors: Vec<(String, u64)>,
    /// "current", "prev1", "prev2", ... quoted, with their colon.
    window_names: Vec<Vec<u8>>,
    /// Each window's start field, `,"startofminute_epoch":` and the
    /// number, by age; the current window's `,"epoch":` and number, then
    /// `,"rate":`: the same for every key, written once per report.
    window_starts: Vec<Vec<u8>>,
    epoch_and_rate: Vec<u8>,
    /// `(window - elapsed) / window`, `elapsed` the seconds since the
    /// current window began: the previous window's share in the rate.
    left_of_window: f64,
    /// The JSON of an empty window at each age (see json_windows).
    empty_windows: Vec<Vec<u8>>,
    /// The JSON of each bucket's value (a percentile is one, or the
    /// maximum): made once per report, copied for every percentile.
    bucket_texts: Vec<Vec<u8>>,
    rendering: Option<Rendering>,
    /// The engine walk filling this report, when it takes several steps.
    pub walk: Option<Walk>,
}

impl Report {
    /// A report at time `now` (seconds) over windows of `window` seconds,
    /// showing `previous` windows before the current one, with the default
    /// Prometheus edges ([`DEFAULT_EDGES_S`]).
    ///
    /// # Errors
    ///
    /// `BadArgument` for a zero window, more than [`MAX_PREVIOUS_WINDOWS`]
    /// previous windows or a `now` outside 0..=[`MAX_NOW`].
    pub fn new(window: u64, now: f64, previous: usize) -> Result<Report, Error> {
        if window == 0 || previous > MAX_PREVIOUS_WINDOWS || !(0.0..=MAX_NOW).contains(&now) {
            return Err(Error::BadArgument);
        }
        Ok(Report {
            window,
            now,
            previous,
            edges: DEFAULT_EDGES_S.to_vec(),
            buf: Buffers::take(),
            runs: Vec::new(),
            run_start: 0,
            heap: Vec::new(),
            merged: false,
            percentiles: true,
            key_info: None,
            admission_errors: Vec::new(),
            window_names: (0..=previous)
                .map(|age| match age {
                    0 => b"\"current\":".to_vec(),
                    _ => format!("\"prev{}\":", age).into_bytes(),
                })
                .collect(),
            window_starts: Vec::new(),
            epoch_and_rate: Vec::new(),
            left_of_window: 0.0,
            empty_windows: Vec::new(),
            bucket_texts: Vec::new(),
            rendering: None,
            walk: None,
        }
        .with_fixed_fields())
    }

    /// The JSON fields whose text is the same for every key.
    fn with_fixed_fields(mut self) -> Report {
        self.window_starts = (0..=self.previous)
            .map(|age| {
                let mut text = b",\"startofminute_epoch\":".to_vec();
                put_i64(&mut text, self.window_start(age));
                text
            })
            .collect();
        let mut text = b",\"epoch\":".to_vec();
        put_i64(&mut text, self.now.floor() as i64);
        text.extend_from_slice(b",\"rate\":");
        self.epoch_and_rate = text;
        let window = self.window as f64;
        let elapsed = self.now - self.window_start(0) as f64;
        self.left_of_window = (window - elapsed) / window;
        self
    }

    /// The Prometheus edges (seconds, as [`crate::histogram::check_edges`]
    /// accepts them) the keys' totals count at, before any key is added.
    ///
    /// # Errors
    ///
    /// `BadArgument` for edges [`crate::histogram::check_edges`] refuses,
    /// or once keys were added.
    pub fn set_edges(&mut self, edges: &[f64]) -> Result<(), Error> {
        if !self.buf.entries.is_empty() || !check_edges(edges) {
            return Err(Error::BadArgument);
        }
        self.edges = edges.to_vec();
        Ok(())
    }

    /// The start (epoch seconds) of the window `age` windows before now.
    fn window_start(&self, age: usize) -> i64 {
        let current = (self.now / self.window as f64).floor() as i64;
        (current - age as i64) * self.window as i64
    }

    /// Adds a key's records: `windows` the current window first, then the
    /// previous ones (missing ones are empty, extra ones ignored). Bytes
    /// that are not UTF-8 are shown as U+FFFD (the shim refuses such keys,
    /// so this only guards against a foreign writer). A key added again
    /// replaces the one before.
    pub fn add(&mut self, key: &[u8], windows: Vec<Summary>, total: Total) {
        self.add_parts(key, &windows, total.count, total.sum, &total.at_or_below);
    }

    /// [`Report::add`] without a vector per key: `at_or_below` one count
    /// per edge (missing ones 0, extra ones ignored).
    pub fn add_parts(
        &mut self,
        key: &[u8],
        windows: &[Summary],
        count: u64,
        sum: f64,
        at_or_below: &[u64],
    ) {
        let start = self.buf.key_text.len();
        match std::str::from_utf8(key) {
            Ok(text) => self.buf.key_text.push_str(text),
            Err(_) => self.buf.key_text.push_str(&String::from_utf8_lossy(key)),
        }
        self.buf.entries.push(Entry {
            key: (start, self.buf.key_text.len()),
            count,
            sum,
        });
        let shown = windows.len().min(self.previous + 1);
        self.buf.summaries.extend_from_slice(&windows[..shown]);
        self.buf
            .summaries
            .extend((shown..=self.previous).map(|_| Summary::default()));
        let edges = self.edges.len();
        let given = at_or_below.len().min(edges);
        self.buf
            .at_or_below
            .extend_from_slice(&at_or_below[..given]);
        self.buf.at_or_below.extend((given..edges).map(|_| 0));
        self.merged = false;
        self.buf.order.clear();
    }

    /// Makes room for `keys` more keys at once: a report filled in steps
    /// then never grows a vector by copying it (megabytes at 100,000 keys)
    /// in one of its steps.
    pub fn reserve_keys(&mut self, keys: usize) {
        self.buf.entries.reserve(keys);
        self.buf.summaries.reserve(keys * (self.previous + 1));
        self.buf.at_or_below.reserve(keys * self.edges.len());
        self.buf.sorted.reserve(keys);
        self.buf.order.reserve(keys);
        self.buf.key_text.reserve(keys * 16);
    }

    /// Ends a run of keys: those added since the last run, sorted now (a
    /// walk's step ends one). Rendering merges the runs.
    pub fn end_run(&mut self) {
        let (start, end) = (self.buf.sorted.len(), self.buf.entries.len());
        if self.run_start >= end {
            return;
        }
        // Sorted by the 8 bytes after the prefix every key of the run has
        // (keys such as "/api/v1/..." share one), then by the whole key
        // where those tie: a comparison of words, not of strings apart in
        // memory, for nearly every pair.
        let first = self.key(self.run_start).as_bytes();
        let common = (self.run_start..end).fold(first.len(), |common, entry| {
            let key = self.key(entry).as_bytes();
            first[..common]
                .iter()
                .zip(key)
                .take_while(|(a, b)| a == b)
                .count()
        });
        let mut keyed = std::mem::take(&mut self.buf.keyed);
        keyed.clear();
        keyed.extend((self.run_start..end).map(|entry| {
            let rest = &self.key(entry).as_bytes()[common..];
            let mut word = [0u8; 8];
            let n = rest.len().min(8);
            word[..n].copy_from_slice(&rest[..n]);
            (u64::from_be_bytes(word), entry as u32)
        }));
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| self.entry_order(a.1, b.1)));
        let mut sorted = std::mem::take(&mut self.buf.sorted);
        sorted.extend(keyed.iter().map(|&(_, entry)| entry));
        self.buf.sorted = sorted;
        self.buf.keyed = keyed;
        self.runs.push((start, self.buf.sorted.len()));
        self.run_start = end;
    }

    /// Says, before keys are added, that this report is for the
    /// Prometheus text only, which shows the windows' counts and no
    /// percentiles: the walk then reads no histogram (at 100,000 keys
    /// with traffic in every window, some 300 MB of shared memory).
    /// [`Report::begin_json`] must not be called on it.
    pub fn without_percentiles(&mut self) {
        self.percentiles = false;
    }

    /// Whether the windows' percentiles are wanted.
    pub fn percentiles(&self) -> bool {
        self.percentiles
    }

    /// How many windows before the current one the report shows.
    pub fn previous(&self) -> usize {
        self.previous
    }

    pub fn set_key_info(&mut self, info: KeyInfo) {
        self.key_info = Some(info);
    }

    /// An admitted key's error bound, met while the records are read: for
    /// [`Report::set_admission`].
    pub fn add_admission_error(&mut self, key: &[u8], error: u64) {
        self.admission_errors
            .push((String::from_utf8_lossy(key).into_owned(), error));
    }

    /// Adds the admission's figures, and the error bounds met, to the key
    /// info, once set.
    pub fn set_admission(&mut self, figures: Figures) {
        let mut errors = std::mem::take(&mut self.admission_errors);
        errors.sort();
        if let Some(info) = self.key_info.as_mut() {
            info.admission = Some(Admission { figures, errors });
        }
    }

    /// The key info, once set.
    pub fn key_info_mut(&mut self) -> Option<&mut KeyInfo> {
        self.key_info.as_mut()
    }

    fn key(&self, entry: usize) -> &str {
        let (start, end) = self.buf.entries[entry].key;
        &self.buf.key_text[start..end]
    }

    fn windows(&self, entry: usize) -> &[Summary] {
        let n = self.previous + 1;
        &self.buf.summaries[entry * n..(entry + 1) * n]
    }

    /// Keys in byte order, equal keys in the order added.
    fn entry_order(&self, a: u32, b: u32) -> std::cmp::Ordering {
        self.key(a as usize)
            .cmp(self.key(b as usize))
            .then(a.cmp(&b))
    }

    /// Starts ordering the keys again (unless they are in order): the
    /// open run ended, every run in the merge's heap.
    fn start_merge(&mut self) {
        if self.merged {
            return;
        }
        self.end_run();
        self.buf.order.clear();
        let mut heap = std::mem::take(&mut self.heap);
        heap.clear();
        heap.extend(self.runs.iter().filter(|(start, end)| start < end));
        for i in (0..heap.len() / 2).rev() {
            self.sift_down(&mut heap, i);
        }
        self.heap = heap;
    }

    fn sift_down(&self, heap: &mut [(usize, usize)], mut i: usize) {
        let less = |a: (usize, usize), b: (usize, usize)| {
            self.entry_order(self.buf.sorted[a.0], self.buf.sorted[b.0]) == std::cmp::Ordering::Less
        };
        loop {
            let left = 2 * i + 1;
            if left >= heap.len() {
                return;
            }
            let right = left + 1;
            let least = if right < heap.len() && less(heap[right], heap[left]) {
                right
            } else {
                left
            };
            if !less(heap[least], heap[i]) {
                return;
            }
            heap.swap(i, least);
            i = least;
        }
    }

    /// The least entry left in the runs, taken.
    fn merge_pop(&mut self) -> Option<u32> {
        let mut heap = std::mem::take(&mut self.heap);
        let top = *heap.first()?;
        if top.0 + 1 < top.1 {
            heap[0].0 += 1;
        } else if let Some(last) = heap.pop() {
            if !heap.is_empty() {
                heap[0] = last;
            }
        }
        self.sift_down(&mut heap, 0);
        self.heap = heap;
        Some(self.buf.sorted[top.0])
    }

    /// The entry at position `at` in key order (`at` at most one past the
    /// last one asked for), merging on as needed; None past the last.
    fn entry_at(&mut self, at: usize) -> Option<usize> {
        if let Some(&entry) = self.buf.order.get(at) {
            return Some(entry as usize);
        }
        if self.merged {
            return None;
        }
        let mut entry = match self.merge_pop() {
            Some(entry) => entry,
            None => {
                self.merged = true;
                return None;
            }
        };
        // Of equal keys (in the order added), the last added.
        while let Some(&(next, _)) = self.heap.first() {
            if self.key(self.buf.sorted[next] as usize) != self.key(entry as usize) {
                break;
            }
            entry = self.merge_pop().unwrap_or(entry);
        }
        self.buf.order.push(entry);
        Some(entry as usize)
    }

    fn keys(&self) -> usize {
        self.buf.entries.len()
    }

    /// The sliding-window estimate of requests per window:
    /// `previous * ((window - elapsed) / window) + current`.
    fn rate(&self, current: &Summary, previous: Option<&Summary>) -> f64 {
        let carried = previous.map_or(0.0, |p| p.count as f64 * self.left_of_window);
        carried + current.count as f64
    }

    /// The text's bytes a key takes (in all sections) at most, about:
    /// `per_key` besides its own, which is written `key_times` times.
    fn bytes_per_key(&self, per_key: usize, key_times: usize) -> usize {
        let keys = self.keys().max(1);
        per_key + (self.buf.key_text.len() * key_times + keys - 1) / keys
    }

    /// Starts rendering the JSON of `stats` (every key) or, with `single`,
    /// of `single_stats` (the first key's windows directly under "stats",
    /// all zero when no key was added), written whole by this call. Then
    /// [`Report::render`] writes the keys. Written with `serde_json`'s
    /// string escaping and number formatting, with no tree built first:
    /// byte for byte what `serde_json::to_writer` writes of the whole
    /// report (a test holds it to that).
    pub fn begin_json(&mut self, free_space: f64, capacity: f64, single: bool) {
        self.start_merge();
        self.empty_windows = self.empty_windows();
        if self.bucket_texts.is_empty() {
            self.bucket_texts = (0..BUCKETS)
                .map(|bucket| {
                    let mut text = Vec::new();
                    json_f64(&mut text, bucket_value(bucket));
                    text
                })
                .collect();
        }
        // Some 130 bytes a window, and the key (with quotes).
        let per_key = self.bytes_per_key(16 + 130 * (self.previous + 1), 1);
        let mut out = std::mem::take(&mut self.buf.rendered);
        out.clear();
        let info = DictInfo {
            free_space,
            capacity,
        };
        // Writing to a Vec cannot fail, and every number is finite or null.
        out.extend_from_slice(b"{\"shared_dict_info\":");
        let _ = serde_json::to_writer(&mut out, &info);
        out.extend_from_slice(b",\"stats\":");
        if single {
            match self.entry_at(0) {
                Some(entry) => self.json_windows(&mut out, self.windows(entry)),
                None => {
                    let empty = vec![Summary::default(); self.previous + 1];
                    self.json_windows(&mut out, &empty);
                }
            }
            self.json_end(&mut out);
            self.rendering = None;
        } else {
            out.push(b'{');
            self.rendering = Some(Rendering {
                format: Format::Json,
                section: 0,
                next: 0,
                per_key,
            });
        }
        self.buf.rendered = out;
    }

    fn json_end(&self, out: &mut Vec<u8>) {
        if let Some(info) = &self.key_info {
            out.extend_from_slice(b",\"key_info\":");
            let _ = serde_json::to_writer(&mut *out, info);
        }
        out.push(b'}');
    }

    /// One key's windows as a JSON object. An empty window (most are,
    /// on most keys) is the same text at its age for every key: written
    /// once per report, then copied.
    fn json_windows(&self, out: &mut Vec<u8>, windows: &[Summary]) {
        put(out, b"{");
        for (age, h) in windows.iter().enumerate() {
            if age > 0 {
                put(out, b",");
            }
            put(out, &self.window_names[age]);
            // The current window's rate counts the one before it too.
            let empty = is_empty(h) && (age > 0 || windows.get(1).map_or(true, is_empty));
            match self.empty_windows.get(age) {
                Some(text) if empty => put(out, text),
                _ => self.json_window(out, windows, age, h),
            }
        }
        put(out, b"}");
    }

    /// The text of an empty window at each age.
    fn empty_windows(&self) -> Vec<Vec<u8>> {
        let empty = vec![Summary::default(); self.previous + 1];
        (0..=self.previous)
            .map(|age| {
                let mut text = Vec::new();
                self.json_window(&mut text, &empty, age, &empty[age]);
                text
            })
            .collect()
    }

    /// One window as serde_json writes a map of its fields.
    fn json_window(&self, out: &mut Vec<u8>, windows: &[Summary], age: usize, h: &Summary) {
        put(out, b"{\"requests\":");
        put_u64(out, h.count);
        put(out, b",\"latency_ms\":");
        json_f64(out, h.mean());
        put(out, &self.window_starts[age]);
        // null when the engine keeps no histograms (too small for them).
        // A percentile equal to the one before, or the maximum equal to
        // the last (a key of few distinct latencies: p99 of fewer than 100
        // requests is the maximum), is the same text again.
        let mut before: Option<(u64, Range<usize>)> = None;
        for (i, name) in [&b",\"p50\":"[..], b",\"p90\":", b",\"p99\":"]
            .iter()
            .enumerate()
        {
            put(out, name);
            match h.percentiles {
                Some(p) => self.json_number(out, p[i], &mut before),
                None => put(out, b"null"),
            }
        }
        put(out, b",\"max\":");
        self.json_number(out, h.max, &mut before);
        if age == 0 {
            put(out, &self.epoch_and_rate);
            json_f64(out, self.rate(h, windows.get(1)));
        }
        put(out, b"}");
    }

    /// A latency as [`json_f64`] writes it, copied from the text of the
    /// one written `before` when it is the same (then the text of this one)
    /// or from the text of its bucket's value made once per report.
    #[inline]
    fn json_number(&self, out: &mut Vec<u8>, value: f64, before: &mut Option<(u64, Range<usize>)>) {
        let bits = value.to_bits();
        if let Some((seen, text)) = before {
            if *seen == bits {
                put_within(out, text.clone());
                return;
            }
        }
        let start = out.len();
        // A bucket's value (a percentile, unless the maximum was below
        // it): its text made once.
        let bucket = bucket_of(value);
        match self.bucket_texts.get(bucket as usize) {
            Some(text) if bucket_value(bucket).to_bits() == bits => put(out, text),
            _ => json_f64(out, value),
        }
        *before = Some((bits, start..out.len()));
    }

    /// Starts rendering the Prometheus text exposition format: requests as
    /// a counter and latency as a histogram (both since the key was first
    /// recorded), the sliding-window rate as a gauge; every sample
    /// labelled with the dict and the key. [`Report::render`] writes it.
    pub fn begin_prometheus(&mut self, dict: &str) {
        self.start_merge();
        let mut escaped = Vec::new();
        escape_label(&mut escaped, dict);
        let edges = self.edges.len();
        // (E + 5) lines of labels (the key's among them), 185 + 45 E bytes
        // of names and punctuation, the le values, some 12 digits a number.
        let le: usize = self.edges.iter().map(|e| format!("{}", e).len()).sum();
        let per_key = (edges + 5) * (15 + escaped.len()) + 185 + 45 * edges + le + 12 * (edges + 6);
        let per_key = self.bytes_per_key(per_key, edges + 5);
        self.buf.rendered.clear();
        self.buf
            .rendered
            .extend_from_slice(PROMETHEUS_SECTIONS[0].as_bytes());
        let edges = self
            .edges
            .iter()
            .map(|le| format!(",le=\"{}\"}} ", le).into_bytes())
            .collect();
        self.rendering = Some(Rendering {
            format: Format::Prometheus {
                dict: escaped,
                edges,
                window: format!(",window=\"{}\"}} ", self.window).into_bytes(),
            },
            section: 0,
            next: 0,
            per_key,
        });
    }

    /// Renders up to `max_keys` more keys (at least one) of what
    /// [`Report::begin_json`] or [`Report::begin_prometheus`] began: true
    /// when the text is whole.
    pub fn render(&mut self, max_keys: usize) -> bool {
        self.render_upto(max_keys, usize::MAX).0
    }

    /// Renders as [`Report::render`] does, up to `max_keys` keys (at
    /// least one), and stops as well after the key that brings the text
    /// held (since the last [`Report::clear_text`]) to `max_bytes` bytes or
    /// more: whether the text is whole, and how many keys were rendered
    /// (a key in each Prometheus section counts once per section). A
    /// `write` scrape hands its text on in pieces of about `max_bytes`.
    pub fn render_upto(&mut self, max_keys: usize, max_bytes: usize) -> (bool, usize) {
        let mut out = std::mem::take(&mut self.buf.rendered);
        let (done, rendered) = self.render_into(&mut out, max_keys.max(1), max_bytes);
        self.buf.rendered = out;
        if done {
            self.rendering = None;
        }
        (done, rendered)
    }

    fn render_into(
        &mut self,
        out: &mut Vec<u8>,
        max_keys: usize,
        max_bytes: usize,
    ) -> (bool, usize) {
        let (format, mut section, mut next, per_key) = match self.rendering.take() {
            Some(r) => (r.format, r.section, r.next, r.per_key),
            None => return (true, 0),
        };
        let sections = match format {
            Format::Json => 1,
            Format::Prometheus { .. } => PROMETHEUS_SECTIONS.len(),
        };
        // Room for this step's keys at once (or for its bytes, and a key
        // more): the text is never copied to grow (a copy of up to 150 MB).
        let left = ((sections - section) * self.keys()).saturating_sub(next);
        let room = (left.min(max_keys) * per_key / sections)
            .min(max_bytes.saturating_sub(out.len()).saturating_add(per_key));
        reserve(out, 512 + room);
        let mut labels = Vec::new();
        let mut left = max_keys;
        // Whether the text reached max_bytes: the step ends as if its keys
        // were all rendered.
        let mut full = false;
        let mut done = true;
        while section < sections {
            while left > 0 && !full {
                let entry = match self.entry_at(next) {
                    Some(entry) => entry,
                    None => break,
                };
                match &format {
                    Format::Json => {
                        if next > 0 {
                            put(out, b",");
                        }
                        json_key(out, self.key(entry));
                        self.json_windows(out, self.windows(entry));
                    }
                    Format::Prometheus {
                        dict,
                        edges,
                        window,
                    } => {
                        labels.clear();
                        put(&mut labels, b"{dict=\"");
                        put(&mut labels, dict);
                        put(&mut labels, b"\",key=\"");
                        escape_label(&mut labels, self.key(entry));
                        put(&mut labels, b"\"");
                        self.prometheus_key(out, section, &labels, edges, window, entry);
                    }
                }
                next += 1;
                left -= 1;
                full = out.len() >= max_bytes;
            }
            if self.entry_at(next).is_some() {
                done = false;
                break;
            }
            // The section is whole.
            section += 1;
            next = 0;
            match &format {
                Format::Json => {
                    out.push(b'}');
                    self.json_end(out);
                }
                Format::Prometheus { dict, .. } => {
                    if let Some(header) = PROMETHEUS_SECTIONS.get(section) {
                        out.extend_from_slice(header.as_bytes());
                    } else {
                        self.prometheus_gauges(out, &String::from_utf8_lossy(dict));
                    }
                }
            }
            if section < sections && (left == 0 || full) {
                done = false;
                break;
            }
        }
        if !done {
            self.rendering = Some(Rendering {
                format,
                section,
                next,
                per_key,
            });
        }
        (done, max_keys - left)
    }

    /// After the keys: how many are tracked and the engine's memory, when
    /// the key info was set.
    fn prometheus_gauges(&self, out: &mut Vec<u8>, dict: &str) {
        let info = match &self.key_info {
            Some(info) => info,
            None => return,
        };
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{dict=\"{dict}\"}} {value}\n",
                name = name,
                help = help,
                dict = dict,
                value = value
            );
        };
        gauge(
            "resty_requests_tracked_keys",
            "Request keys tracked, of max_keys.",
            info.tracked,
        );
        if let Some(engine) = &info.engine {
            gauge(
                "resty_requests_engine_used_bytes",
                "Bytes of the dict's shared engine in records, free ones included.",
                engine.used_bytes,
            );
            gauge(
                "resty_requests_engine_bytes",
                "Size of the dict's shared engine.",
                engine.bytes,
            );
        }
        if let Some(admission) = &info.admission {
            let f = &admission.figures;
            for (name, help, value) in [
                (
                    "resty_requests_refused_requests",
                    "Requests of keys past max_keys (under the overflow key).",
                    f.refused_requests,
                ),
                (
                    "resty_requests_refused_keys",
                    "Keys refused past max_keys (about: first sightings).",
                    f.refused_keys,
                ),
                (
                    "resty_requests_admitted_keys",
                    "Keys admitted past max_keys in place of a tracked one.",
                    f.admitted,
                ),
                (
                    "resty_requests_evicted_keys",
                    "Tracked keys evicted for an admitted one (folded into the overflow key).",
                    f.evicted,
                ),
            ] {
                gauge(name, help, value);
            }
            let name = "resty_requests_admission_error";
            let _ = write!(
                out,
                "# HELP {name} Requests an admitted key may have had under the overflow key.\n\
                 # TYPE {name} gauge\n",
                name = name
            );
            for (key, error) in &admission.errors {
                let _ = write!(out, "{}{{dict=\"{}\",key=\"", name, dict);
                escape_label(out, key);
                let _ = writeln!(out, "\"}} {}", error);
            }
        }
    }

    /// One key's lines of Prometheus section `section`.
    fn prometheus_key(
        &self,
        out: &mut Vec<u8>,
        section: usize,
        labels: &[u8],
        edges: &[Vec<u8>],
        window: &[u8],
        entry: usize,
    ) {
        let total = &self.buf.entries[entry];
        let line = |out: &mut Vec<u8>, name: &[u8], rest: &[u8]| {
            put(out, name);
            put(out, labels);
            put(out, rest);
        };
        match section {
            0 => {
                line(out, b"resty_requests_total", b"} ");
                push_u64(out, total.count);
            }
            1 => {
                let n = self.edges.len();
                let at_or_below = &self.buf.at_or_below[entry * n..(entry + 1) * n];
                // The bucket lines' name and labels, once, then copied
                // from the first line to the next ones.
                let start = out.len();
                line(out, b"resty_request_latency_seconds_bucket", b"");
                let prefix = start..out.len();
                let buckets = edges
                    .iter()
                    .map(|le| &le[..])
                    .zip(at_or_below.iter().copied());
                let inf = (&b",le=\"+Inf\"} "[..], total.count);
                for (i, (le, count)) in buckets.chain(std::iter::once(inf)).enumerate() {
                    if i > 0 {
                        put_within(out, prefix.clone());
                    }
                    put(out, le);
                    push_u64(out, count);
                }
                line(out, b"resty_request_latency_seconds_sum", b"} ");
                push_display_f64(out, total.sum / 1000.0);
                line(out, b"resty_request_latency_seconds_count", b"} ");
                push_u64(out, total.count);
            }
            _ => {
                let windows = self.windows(entry);
                line(out, b"resty_requests_window_rate", window);
                push_display_f64(out, self.rate(&windows[0], windows.get(1)));
            }
        }
    }

    /// The text rendered so far (whole once [`Report::render`] said so),
    /// since the last [`Report::clear_text`].
    pub fn text(&self) -> &[u8] {
        &self.buf.rendered
    }

    /// Forgets the text rendered so far (it was handed on): a report
    /// rendered in steps then holds one step's text at a time.
    pub fn clear_text(&mut self) {
        self.buf.rendered.clear();
    }

    /// The JSON of `stats` (or `single_stats`), rendered in one step.
    pub fn json(&mut self, free_space: f64, capacity: f64, single: bool) -> &str {
        self.begin_json(free_space, capacity, single);
        self.render(usize::MAX);
        // serde_json writes UTF-8 only.
        std::str::from_utf8(&self.buf.rendered).unwrap_or_default()
    }

    /// The Prometheus text, rendered in one step.
    pub fn prometheus(&mut self, dict: &str) -> &str {
        self.begin_prometheus(dict);
        self.render(usize::MAX);
        // Keys and the dict's name are UTF-8 (lossy), the rest ASCII.
        std::str::from_utf8(&self.buf.rendered).unwrap_or_default()
    }
}

/// The large buffers of a report, kept by the process when the report is
/// freed for its next one: at 100,000 keys they are some 180 MB (150 MB
/// of them the Prometheus text), which a fresh report would take from the
/// kernel again, one zeroed page at a time (a fifth of the scrape's time).
/// Kept lazily freed (`MADV_FREE`): the kernel takes their pages back when
/// it needs memory (a page it took reads as zero, and is zeroed again on
/// its next write: the fresh report's cost, no more); until then a page
/// is reused as it is. Empty (length 0) while kept: nothing is read from
/// them before it is written again.
#[derive(Debug, Default)]
struct Buffers {
    /// Every key's text (UTF-8, lossy), one after another.
    key_text: String,
    /// In the order added.
    entries: Vec<Entry>,
    /// `previous` + 1 window summaries per entry, the current first.
    summaries: Vec<Summary>,
    /// One count per edge and entry: requests at or below the edge.
    at_or_below: Vec<u64>,
    /// Entries in runs (the keys of one step of a walk), each run sorted
    /// by key when it ends.
    sorted: Vec<u32>,
    /// A run's sort keys (see [`Report::end_run`]).
    keyed: Vec<(u64, u32)>,
    /// Entries in key order, the last added of equal keys (every worker
    /// renders the same text): as far as the merge went.
    order: Vec<u32>,
    /// The text.
    rendered: Vec<u8>,
}

/// The buffers of the reports freed so far, each the largest of its kind.
static SPARE: std::sync::Mutex<Option<Buffers>> = std::sync::Mutex::new(None);

impl Buffers {
    /// The buffers kept, or new ones (empty either way).
    fn take() -> Buffers {
        SPARE
            .lock()
            .ok()
            .and_then(|mut spare| spare.take())
            .unwrap_or_default()
    }

    /// Keeps `self`'s buffers where they are larger than those kept.
    fn keep(self) {
        let mut kept = match SPARE.lock() {
            Ok(kept) => kept,
            Err(_) => return,
        };
        let kept = kept.get_or_insert_with(Buffers::default);
        let mut text = self.key_text.into_bytes();
        text.clear();
        let mut kept_text = std::mem::take(&mut kept.key_text).into_bytes();
        keep_larger(&mut kept_text, text);
        // Empty: valid UTF-8.
        kept.key_text = String::from_utf8(kept_text).unwrap_or_default();
        keep_larger(&mut kept.entries, self.entries);
        keep_larger(&mut kept.summaries, self.summaries);
        keep_larger(&mut kept.at_or_below, self.at_or_below);
        keep_larger(&mut kept.sorted, self.sorted);
        keep_larger(&mut kept.keyed, self.keyed);
        keep_larger(&mut kept.order, self.order);
        keep_larger(&mut kept.rendered, self.rendered);
    }
}

/// Keeps the larger of `kept` and `offered`, emptied, its pages lazily
/// freed; the other is freed.
fn keep_larger<T>(kept: &mut Vec<T>, mut offered: Vec<T>) {
    if offered.capacity() <= kept.capacity() {
        return;
    }
    offered.clear();
    lazy_free(
        offered.as_ptr() as usize,
        offered.capacity() * std::mem::size_of::<T>(),
    );
    *kept = offered;
}

/// Gives the whole pages of `bytes` bytes at `start` (an allocation of
/// ours, its contents no longer needed) back to the kernel lazily: see
/// [`Buffers`]. Small ones are left as they are.
fn lazy_free(start: usize, bytes: usize) {
    const PAGE: usize = 4096;
    if bytes < 256 * PAGE {
        return;
    }
    let from = (start + PAGE - 1) & !(PAGE - 1);
    let to = (start + bytes) & !(PAGE - 1);
    if to > from {
        // Advice only: refused (a kernel before 4.5), the pages stay.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_FREE) };
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        std::mem::take(&mut self.buf).keep();
    }
}

/// Makes room for `more` bytes in `out`. A large text is backed by huge
/// pages where the kernel offers them on request (transparent huge pages
/// in `madvise` mode): writing 150 MB into fresh 4 KB pages takes 37,000
/// page faults, which cost more than the writing.
fn reserve(out: &mut Vec<u8>, more: usize) {
    if out.capacity() - out.len() >= more {
        return;
    }
    out.reserve(more);
    if out.capacity() >= 4 * HUGE_PAGE {
        advise_huge_pages(out.as_ptr() as usize, out.capacity());
    }
}

/// The huge page size that transparent huge pages use on x86_64 and on
/// aarch64 with 4 KB pages.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole huge pages within `bytes` from
/// `start` by huge pages when they are first touched (transparent huge
/// pages in `madvise` mode; `always` needs no asking).
pub(crate) fn advise_huge_pages(start: usize, bytes: usize) {
    let from = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let to = (start + bytes) & !(HUGE_PAGE - 1);
    if to > from {
        // Advice only: refused (no such pages here), nothing changes.
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
    }
}

/// Whether a window is [`Summary::default`], bit for bit (-0.0 is not 0.0
/// in the text).
fn is_empty(h: &Summary) -> bool {
    let zero = |v: f64| v.to_bits() == 0;
    h.count == 0
        && zero(h.sum)
        && zero(h.max)
        && h.percentiles.map_or(false, |p| p.iter().all(|&v| zero(v)))
}

/// Appends `bytes` to `out`. The text is written in pieces of a few bytes
/// to a hundred (labels, names, numbers): copied here with a few unaligned
/// loads and stores, where `extend_from_slice` calls `memcpy` for each
/// piece of a length not known when compiling (some 5 million calls for
/// the Prometheus text of 100,000 keys).
#[inline(always)]
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    let (len, n) = (out.len(), bytes.len());
    if out.capacity() - len < n {
        grow(out, n);
    }
    // SAFETY: `n` bytes are free past `len` (just checked or made), and
    // `bytes` cannot overlap `out`'s spare capacity (borrowed apart).
    unsafe {
        copy_short(bytes.as_ptr(), out.as_mut_ptr().add(len), n);
        out.set_len(len + n);
    }
}

/// Appends the bytes of `out` in `range` again (as `extend_from_within`).
#[inline(always)]
fn put_within(out: &mut Vec<u8>, range: Range<usize>) {
    let (len, n) = (out.len(), range.len());
    assert!(range.end <= len);
    if out.capacity() - len < n {
        grow(out, n);
    }
    // SAFETY: the range is within the text (checked), the `n` bytes past
    // `len` free and apart from it.
    unsafe {
        let base = out.as_mut_ptr();
        copy_short(base.add(range.start), base.add(len), n);
        out.set_len(len + n);
    }
}

/// Room for `more` bytes, out of the writers' way.
#[cold]
#[inline(never)]
fn grow(out: &mut Vec<u8>, more: usize) {
    reserve(out, more);
}

/// Copies `n` bytes from `src` to `dst`: up to 128 with overlapping loads
/// and stores of 16, 8, 4 or 1 byte that never read or write outside the
/// two ranges; more with `copy_nonoverlapping`.
///
/// # Safety
///
/// `src` readable and `dst` writable for `n` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_short(src: *const u8, dst: *mut u8, n: usize) {
    use std::ptr::{read_unaligned as load, write_unaligned as store};
    if n >= 16 {
        if n > 128 {
            std::ptr::copy_nonoverlapping(src, dst, n);
            return;
        }
        let mut at = 0;
        while at + 16 < n {
            store(dst.add(at) as *mut u128, load(src.add(at) as *const u128));
            at += 16;
        }
        let last = n - 16;
        store(
            dst.add(last) as *mut u128,
            load(src.add(last) as *const u128),
        );
    } else if n >= 8 {
        let (head, tail) = (load(src as *const u64), load(src.add(n - 8) as *const u64));
        store(dst as *mut u64, head);
        store(dst.add(n - 8) as *mut u64, tail);
    } else if n >= 4 {
        let (head, tail) = (load(src as *const u32), load(src.add(n - 4) as *const u32));
        store(dst as *mut u32, head);
        store(dst.add(n - 4) as *mut u32, tail);
    } else {
        for i in 0..n {
            *dst.add(i) = *src.add(i);
        }
    }
}

/// "00" to "99", two digits at a time.
const DIGITS2: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// 10^0 to 10^19.
const POW10: [u64; 20] = {
    let mut pow = [1u64; 20];
    let mut i = 1;
    while i < 20 {
        pow[i] = pow[i - 1] * 10;
        i += 1;
    }
    pow
};

/// The number of decimal digits of `value`.
#[inline(always)]
fn decimal_len(value: u64) -> usize {
    // floor(log10(2^bits)) is bits * 1233 >> 12 for bits up to 64: the
    // length, or one more than it below the next power of ten.
    let bits = 64 - (value | 1).leading_zeros();
    let t = ((bits * 1233) >> 12) as usize;
    t + usize::from(value >= POW10[t]).max(usize::from(t == 0))
}

/// Writes the `len` digits of `value` (`len` its [`decimal_len`], or more
/// for leading zeros) ending at `end`.
///
/// # Safety
///
/// The `len` bytes before `end` are writable.
#[inline(always)]
unsafe fn write_digits(mut value: u64, end: *mut u8, len: usize) {
    let mut at = end;
    let stop = end.sub(len);
    while value >= 100 {
        let pair = (value % 100) as usize * 2;
        value /= 100;
        at = at.sub(2);
        std::ptr::copy_nonoverlapping(DIGITS2.as_ptr().add(pair), at, 2);
    }
    if value >= 10 {
        at = at.sub(2);
        std::ptr::copy_nonoverlapping(DIGITS2.as_ptr().add(value as usize * 2), at, 2);
    } else if at > stop {
        at = at.sub(1);
        *at = b'0' + value as u8;
    }
    while at > stop {
        at = at.sub(1);
        *at = b'0';
    }
}

/// Appends an integer as itoa (and Rust's `{}`) writes it: a minus sign
/// when `negative`, then the digits of `magnitude`; then a newline with
/// `newline`.
#[inline(always)]
fn put_integer(out: &mut Vec<u8>, negative: bool, magnitude: u64, newline: bool) {
    let len = decimal_len(magnitude);
    let sign = usize::from(negative);
    let n = sign + len + usize::from(newline);
    let at = out.len();
    if out.capacity() - at < n {
        grow(out, n);
    }
    // SAFETY: `n` bytes are free past `at`.
    unsafe {
        let start = out.as_mut_ptr().add(at);
        if negative {
            *start = b'-';
        }
        write_digits(magnitude, start.add(sign + len), len);
        if newline {
            *start.add(sign + len) = b'\n';
        }
        out.set_len(at + n);
    }
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    put_integer(out, false, value, false);
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    put_integer(out, value < 0, value.unsigned_abs(), false);
}

/// A finite `value` of magnitude 1e-4 to below 1e15 that a decimal of
/// at most 15 significant digits reads back as: that decimal's digits
/// `m` and the digits `k` after its point (value = ±m / 10^k, k >= 1, no
/// trailing zero), the fewest; None for any other value (whole numbers
/// included).
///
/// Why this is the text ryu (serde_json) and Rust's `{}` write: both
/// write the shortest decimal that reads back as `value` (the closest of
/// them where several are as short). With `d` = floor(log10 |value|),
/// decimals of 15 significant digits lie 10^(d-14) apart, more than the
/// width of the interval that reads back as `value` (under one ulp, at
/// most 2^-52 * 10^(d+1) < 0.23 * 10^(d-14)): at most one decimal of 15
/// digits or fewer (at magnitude d, or 10^(d+1) at the interval's top)
/// reads back as `value`. Found here as `m` = |value| * 10^K rounded, K =
/// 14 - d: with |m| < 10^15 the product's rounding (< 1/16) and the
/// interval (< 0.12) leave it within 0.18 of the decimal, so rounding finds
/// it; `m` / 10^K (a correctly rounded division of two exact doubles) is
/// `value` exactly when that decimal reads back as `value`. Its trailing
/// zeros dropped, it is the shortest: a shorter decimal would be one more
/// point of the same grid. A wrong `d` (the estimate below is off by one
/// near powers of ten) only makes the grid coarser (then still unique)
/// or `m` 10^15 or more (refused).
#[inline]
fn short_decimal(value: f64) -> Option<(bool, u64, usize)> {
    let a = value.abs();
    if !(1e-4..1e15).contains(&a) {
        return None;
    }
    // floor(log10 a) from the binary exponent (within one).
    let e = ((a.to_bits() >> 52) as i32) - 1023;
    let d = (e * 78913) >> 18;
    let d = d + i32::from(a >= POW10_F[(d + 1 + POW10_F_ZERO) as usize]);
    let k = (14 - d) as usize;
    let scaled = a * POW10_F[k + POW10_F_ZERO as usize];
    if scaled >= 1e15 {
        return None;
    }
    // Exact: below 2^50 the double's ulp is 1/8 or less.
    let mut m = (scaled + 0.5) as u64;
    // The decimal, if any, is within 0.18 of `scaled` (the difference is
    // exact): most values of 16 or 17 digits need no division to refuse.
    if (scaled - m as f64).abs() > 0.18
        || m as f64 / POW10_F[k + POW10_F_ZERO as usize] != a
        || m == 0
    {
        return None;
    }
    let mut k = k;
    while k > 0 && m % 10 == 0 {
        m /= 10;
        k -= 1;
    }
    if k == 0 {
        return None;
    }
    Some((value < 0.0, m, k))
}

/// Index of 10^0 in [`POW10_F`].
const POW10_F_ZERO: i32 = 5;

/// 10^-5 to 10^19 as doubles (exact from 10^0 on).
const POW10_F: [f64; 25] = [
    1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
];

/// Appends a [`short_decimal`]: its sign, digits and point.
fn put_short_decimal(out: &mut Vec<u8>, negative: bool, m: u64, k: usize) {
    let len = decimal_len(m);
    // "0.000m" when m has no more digits than the fraction.
    let whole = len.saturating_sub(k);
    let n = usize::from(negative) + whole.max(1) + 1 + k;
    let at = out.len();
    if out.capacity() - at < n {
        grow(out, n);
    }
    // SAFETY: `n` bytes are free past `at`.
    unsafe {
        let mut p = out.as_mut_ptr().add(at);
        if negative {
            *p = b'-';
            p = p.add(1);
        }
        let fraction = m % POW10[k];
        if whole == 0 {
            *p = b'0';
            p = p.add(1);
        } else {
            write_digits(m / POW10[k], p.add(whole), whole);
            p = p.add(whole);
        }
        *p = b'.';
        write_digits(fraction, p.add(1 + k), k);
        out.set_len(at + n);
    }
}

/// A number of the JSON (a latency, a percentile, a rate) as greencheek's
/// original gives it, in serde_json's notation: rounded to 14 significant
/// digits as C's `"%.14g"` rounds it (cjson's default precision, which the
/// original encodes with: the nearest such decimal, a tie to the even
/// digit), written as serde_json (ryu) writes that number: `33.0` for a
/// whole number (cjson: `33`), no exponent from 1e-4 to below 1e15; null
/// when not finite. The digits past the 14th of a latency in milliseconds
/// are the arithmetic's (1.001 s is 1000.9999999999999 ms, a mean of
/// those sums is as long), not the clock's (a microsecond at best).
///
/// Why the text is serde_json's of the rounded number: a decimal of 15
/// significant digits or fewer is the shortest form of the double nearest
/// to it (see [`short_decimal`]), which ryu writes.
fn json_f64(out: &mut Vec<u8>, value: f64) {
    if let Some(whole) = small_whole(value).filter(|w| w.unsigned_abs() < POW10[14]) {
        // A whole number of 14 digits or fewer: its digits, ".0".
        put_i64(out, whole);
        put(out, b".0");
    } else if let Some((negative, m, k)) = round14(value) {
        put_round14(out, negative, m, k);
    } else if value.is_finite() {
        // Below 1e-4 or from 1e15 (not a latency in milliseconds): Rust's
        // formatter rounds as C's (exact, ties to even).
        let rounded = format!("{:.13e}", value).parse().unwrap_or(value);
        put(out, ryu::Buffer::new().format_finite(rounded).as_bytes());
    } else {
        put(out, b"null");
    }
}

/// `value` rounded to 14 significant digits as C's `"%.14g"` rounds it,
/// when that is 1e-4 or more and below 1e15 in magnitude: its sign, and
/// `m` (14 digits) and `k` (-1 to 18) with the rounded value ±m / 10^k;
/// None for any other value (0 included).
///
/// Exact, with integers: `value` is `mantissa / 2^shift`, so `value x
/// 10^k` (the 14 digits before the point) is `mantissa x 10^k` (below
/// 2^113) shifted right, rounded by the bits shifted out (more than half:
/// up; exactly half: to even), as glibc's `printf` rounds the exact value
/// (in the default rounding mode).
#[inline]
fn round14(value: f64) -> Option<(bool, u64, i32)> {
    let a = value.abs();
    if !(1e-4..1e15).contains(&a) {
        return None;
    }
    let bits = a.to_bits();
    // A normal number (1e-4 is above 2^-14): shift 3 (below 2^50) to 66.
    let mantissa = u128::from((bits & ((1 << 52) - 1)) | (1 << 52));
    let exponent = (bits >> 52) as i32 - 1023;
    let shift = (52 - exponent) as u32;
    // 13 - floor(log10 a), or one more (the estimate of the logarithm
    // may be one low); the rounding may carry to 10^14 (9.99999999999995
    // is 10): then one less.
    let mut k = 13 - ((exponent * 78913) >> 18);
    loop {
        let (quotient, rest, unit) = if k >= 0 {
            let scaled = mantissa * u128::from(POW10[k as usize]);
            (scaled >> shift, scaled & ((1 << shift) - 1), 1u128 << shift)
        } else {
            // 1e14 or more: a divisor of 10^-k x 2^shift.
            let unit = u128::from(POW10[k.unsigned_abs() as usize]) << shift;
            (mantissa / unit, mantissa % unit, unit)
        };
        let up = 2 * rest > unit || (2 * rest == unit && quotient & 1 == 1);
        let m = quotient as u64 + u64::from(up);
        if m >= POW10[14] {
            k -= 1;
        } else if m < POW10[13] {
            // Never in this range (the estimate of the logarithm is never
            // high there): a guard.
            k += 1;
        } else if k < -1 {
            // 10^15 (from 999999999999999.5 on): json_f64's other path.
            return None;
        } else {
            return Some((value < 0.0, m, k));
        }
    }
}

/// Appends a [`round14`]: ±m / 10^k, `m` of 14 digits, `k` from -1 to
/// 18, as ryu writes that number (its trailing zeros dropped; `.0` after
/// a whole number; `0.` and the zeros after the point below 1). The 14
/// digits are made at once ([`eight_digits`]) and stored in a few
/// unaligned stores, the point put in between: no division by a power of
/// ten that depends on `k`.
#[inline]
fn put_round14(out: &mut Vec<u8>, negative: bool, m: u64, k: i32) {
    debug_assert!((POW10[13]..POW10[14]).contains(&m) && (-1..=18).contains(&k));
    // The 16 digits of m (two leading zeros), the first in the lowest
    // byte; its trailing zeros are the top bytes that are '0'.
    let ascii = u128::from(eight_digits((m / POW10[8]) as u32))
        | u128::from(eight_digits((m % POW10[8]) as u32)) << 64;
    let zeros = ((ascii ^ ASCII_ZEROS).leading_zeros() / 8) as i32;
    let digits = ascii >> 16;
    // Room for a sign, "0.0000", 14 digits and a 16-byte store's tail.
    const MOST: usize = 40;
    let at = out.len();
    if out.capacity() - at < MOST {
        grow(out, MOST);
    }
    // SAFETY: MOST bytes are free past `at`; every store below ends
    // within them (the last one at most 1 + 6 + 16 bytes in).
    unsafe {
        use std::ptr::write_unaligned as store;
        let start = out.as_mut_ptr().add(at);
        *start = b'-';
        let p = start.add(usize::from(negative));
        // Digits after the point, trailing zeros dropped.
        let fraction = k - zeros;
        let n = if k >= 14 {
            // Below 1: "0.", k - 14 zeros (0 to 4), the digits.
            store(p as *mut [u8; 2], *b"0.");
            store(p.add(2) as *mut u32, u32::from_le_bytes(*b"0000"));
            store(p.add(2 + (k - 14) as usize) as *mut u128, digits);
            2 + fraction as usize
        } else {
            // 14 - k digits before the point (15 from 1e14 on: a zero).
            let whole = (14 - k) as usize;
            store(p as *mut u128, digits);
            *p.add(14) = b'0';
            *p.add(whole) = b'.';
            if fraction > 0 {
                store(p.add(whole + 1) as *mut u128, digits >> (8 * whole));
                whole + 1 + fraction as usize
            } else {
                *p.add(whole + 1) = b'0';
                whole + 2
            }
        };
        out.set_len(at + usize::from(negative) + n);
    }
}

/// Sixteen ASCII zeros, as the bytes of a u128.
const ASCII_ZEROS: u128 = u128::from_le_bytes([b'0'; 16]);

/// The 8 digits of `value` (below 10^8, leading zeros included) in ASCII,
/// the first in the lowest byte: its halves, quarters and digits split
/// side by side in the lanes of one word (a multiply and a shift divides
/// every lane by 10^4, 100 or 10 at once).
#[inline(always)]
fn eight_digits(value: u32) -> u64 {
    debug_assert!(value < 100_000_000);
    // Lanes of 32 bits: the first four digits, the last four.
    let v = u64::from(value / 10_000) | u64::from(value % 10_000) << 32;
    // Lanes of 16 bits: pairs of digits (x / 100 = x * 5243 >> 19 below
    // 10^4).
    let high = ((v * 5243) >> 19) & 0x0000_007f_0000_007f;
    let v = high | (v - high * 100) << 16;
    // Lanes of 8 bits: digits (x / 10 = x * 103 >> 10 below 100).
    let high = ((v * 103) >> 10) & 0x000f_000f_000f_000f;
    let v = high | (v - high * 10) << 8;
    v | u64::from_le_bytes([b'0'; 8])
}

/// A whole number of magnitude below 1e15, not -0.0 (which both
/// formatters write with its sign): as an integer, the fast way to its
/// text (counts, rates and sums of whole milliseconds often are).
#[inline]
fn small_whole(value: f64) -> Option<i64> {
    // Below 1e15 the conversion is exact for a whole number (and NaN
    // fails the bound).
    let whole = value.abs() < 1e15
        && (value as i64) as f64 == value
        && value.to_bits() != (-0.0f64).to_bits();
    whole.then_some(value as i64)
}

fn push_i64(out: &mut Vec<u8>, value: i64) {
    put_integer(out, value < 0, value.unsigned_abs(), true);
}

fn push_u64(out: &mut Vec<u8>, value: u64) {
    put_integer(out, false, value, true);
}

/// A number as Rust's `{}` writes an f64 (the shortest form that reads
/// back the same, never an exponent), then a newline: a whole number as
/// an integer, the shortest decimal of 15 digits or fewer without either
/// library (see [`short_decimal`]), any other (16 or 17 digits, where ryu
/// and Rust's formatter may choose between two decimals differently; very
/// small or large; not finite) by Rust's formatter itself.
fn push_display_f64(out: &mut Vec<u8>, value: f64) {
    if let Some(whole) = small_whole(value) {
        push_i64(out, whole);
    } else if let Some((negative, m, k)) = short_decimal(value) {
        put_short_decimal(out, negative, m, k);
        out.push(b'\n');
    } else {
        let _ = writeln!(out, "{}", value);
    }
}

/// The header of each Prometheus section, each over every key.
const PROMETHEUS_SECTIONS: [&str; 3] = [
    "# HELP resty_requests_total Requests recorded, by key.\n\
     # TYPE resty_requests_total counter\n",
    "# HELP resty_request_latency_seconds Request latency, by key.\n\
     # TYPE resty_request_latency_seconds histogram\n",
    "# HELP resty_requests_window_rate Sliding-window estimate of requests per window, by key.\n\
     # TYPE resty_requests_window_rate gauge\n",
];

struct DictInfo {
    free_space: f64,
    capacity: f64,
}

impl Serialize for DictInfo {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Byte counts: integers, as the original shows them.
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("free_space", &(self.free_space.max(0.0) as u64))?;
        map.serialize_entry("capacity", &(self.capacity.max(0.0) as u64))?;
        map.end()
    }
}

impl Serialize for KeyInfo {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("tracked", &self.tracked)?;
        map.serialize_entry("max_keys", &self.max_keys)?;
        map.serialize_entry("overflow_key", &self.overflow_key)?;
        if let Some(engine) = &self.engine {
            map.serialize_entry("engine_used_bytes", &engine.used_bytes)?;
            map.serialize_entry("engine_bytes", &engine.bytes)?;
        }
        if let Some(admission) = &self.admission {
            let f = &admission.figures;
            map.serialize_entry("refused_requests", &f.refused_requests)?;
            map.serialize_entry("refused_keys", &f.refused_keys)?;
            map.serialize_entry("admitted_keys", &f.admitted)?;
            map.serialize_entry("evicted_keys", &f.evicted)?;
            let errors: BTreeMap<&str, u64> = admission
                .errors
                .iter()
                .map(|(key, error)| (key.as_str(), *error))
                .collect();
            map.serialize_entry("errors", &errors)?;
        }
        map.end()
    }
}

/// A JSON object's key (a string as serde_json writes it) and its colon:
/// quoted as it is when serde_json would escape none of its bytes.
fn json_key(out: &mut Vec<u8>, key: &str) {
    if key.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        let _ = serde_json::to_writer(&mut *out, key);
    } else {
        put(out, b"\"");
        put(out, key.as_bytes());
        put(out, b"\"");
    }
    put(out, b":");
}

/// A label value as the exposition format wants it, appended to `out`:
/// backslash, double quote and newline escaped.
fn escape_label(out: &mut Vec<u8>, value: &str) {
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        put(out, value.as_bytes());
        return;
    }
    for b in value.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            b => out.push(b),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::histogram::{Histogram, PROMETHEUS_EDGES_MS};
    use serde_json::Value;

    impl Report {
        /// Every key in order, at once.
        fn sort(&mut self) {
            self.start_merge();
            while self.entry_at(self.buf.order.len()).is_some() {}
        }
    }

    /// What C's `printf("%.14g", value)` writes (lua-cjson's default
    /// number format: greencheek's original JSON), read back; not finite
    /// as it is (serde_json writes it as null).
    fn c_g14(value: f64) -> f64 {
        if !value.is_finite() {
            return value;
        }
        let mut text = [0u8; 64];
        // SAFETY: a buffer of 64 bytes, a format of one double, a double.
        let n = unsafe {
            libc::snprintf(
                text.as_mut_ptr() as *mut libc::c_char,
                text.len(),
                b"%.14g\0".as_ptr() as *const libc::c_char,
                value,
            )
        };
        let text = std::str::from_utf8(&text[..n as usize]).unwrap();
        text.parse().unwrap()
    }

    /// The reference the fast writer is held to: one key's windows as
    /// serde_json serializes them, a map of maps.
    struct KeyView<'a> {
        report: &'a Report,
        windows: &'a [Summary],
    }

    struct WindowView<'a> {
        report: &'a Report,
        windows: &'a [Summary],
        age: usize,
    }

    impl Serialize for KeyView<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.windows.len()))?;
            for age in 0..self.windows.len() {
                let name = match age {
                    0 => "current".to_string(),
                    _ => format!("prev{}", age),
                };
                map.serialize_entry(
                    &name,
                    &WindowView {
                        report: self.report,
                        windows: self.windows,
                        age,
                    },
                )?;
            }
            map.end()
        }
    }

    impl Serialize for WindowView<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let report = self.report;
            let h = &self.windows[self.age];
            let mut map = serializer.serialize_map(None)?;
            // Every latency and rate as C's "%.14g" (cjson) gives it.
            map.serialize_entry("requests", &h.count)?;
            map.serialize_entry("latency_ms", &c_g14(h.mean()))?;
            map.serialize_entry("startofminute_epoch", &report.window_start(self.age))?;
            // null when the engine keeps no histograms (too small for them).
            let percentile = |i: usize| h.percentiles.map(|p| c_g14(p[i]));
            map.serialize_entry("p50", &percentile(0))?;
            map.serialize_entry("p90", &percentile(1))?;
            map.serialize_entry("p99", &percentile(2))?;
            map.serialize_entry("max", &c_g14(h.max))?;
            if self.age == 0 {
                map.serialize_entry("epoch", &(report.now.floor() as i64))?;
                map.serialize_entry("rate", &c_g14(report.rate(h, self.windows.get(1))))?;
            }
            map.end()
        }
    }

    /// The whole report as one `serde_json` map: what the rendering in
    /// steps must write byte for byte.
    struct ReportView<'a> {
        report: &'a Report,
        free_space: f64,
        capacity: f64,
        single: bool,
    }

    struct AllKeys<'a>(&'a Report);

    impl Serialize for ReportView<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let report = self.report;
            let mut map = serializer.serialize_map(None)?;
            map.serialize_entry(
                "shared_dict_info",
                &DictInfo {
                    free_space: self.free_space,
                    capacity: self.capacity,
                },
            )?;
            if self.single {
                let empty = vec![Summary::default(); report.previous + 1];
                let windows = match report.buf.order.first() {
                    Some(&entry) => report.windows(entry as usize),
                    None => &empty,
                };
                map.serialize_entry("stats", &KeyView { report, windows })?;
            } else {
                map.serialize_entry("stats", &AllKeys(report))?;
            }
            if let Some(info) = &report.key_info {
                map.serialize_entry("key_info", info)?;
            }
            map.end()
        }
    }

    impl Serialize for AllKeys<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let report = self.0;
            let order = &report.buf.order;
            assert!(report.merged, "sorted");
            let mut map = serializer.serialize_map(Some(order.len()))?;
            for &entry in order {
                map.serialize_entry(
                    report.key(entry as usize),
                    &KeyView {
                        report,
                        windows: report.windows(entry as usize),
                    },
                )?;
            }
            map.end()
        }
    }

    fn histogram(latencies: &[f64]) -> Summary {
        let mut h = Histogram::new();
        for &v in latencies {
            h.record(v);
        }
        Summary::of(&h)
    }

    fn total(latencies: &[f64]) -> Total {
        Total {
            count: latencies.len() as u64,
            sum: latencies.iter().sum(),
            at_or_below: PROMETHEUS_EDGES_MS
                .iter()
                .map(|edge| latencies.iter().filter(|&&v| v <= *edge).count() as u64)
                .collect(),
        }
    }

    #[test]
    fn json_has_the_original_fields_and_the_rate() {
        // 15 s into the window that starts at 1537724100.
        let mut report = Report::new(60, 1537724115.5, 2).unwrap();
        report.add(
            b"all",
            vec![histogram(&[10.0, 20.0]), histogram(&[1.0; 40])],
            total(&[]),
        );
        let json: Value = serde_json::from_str(report.json(4096.0, 16384.0, false)).unwrap();

        assert_eq!(json["shared_dict_info"]["free_space"], 4096.0);
        assert_eq!(json["shared_dict_info"]["capacity"], 16384.0);
        let current = &json["stats"]["all"]["current"];
        assert_eq!(current["requests"], 2);
        assert_eq!(current["latency_ms"], 15.0);
        assert_eq!(current["startofminute_epoch"], 1537724100);
        assert_eq!(current["epoch"], 1537724115);
        // 40 * ((60 - 15.5) / 60) + 2
        let rate = current["rate"].as_f64().unwrap();
        assert!(
            (rate - (40.0 * (44.5 / 60.0) + 2.0)).abs() < 1e-9,
            "{}",
            rate
        );
        assert_eq!(current["max"], 20.0);
        let prev1 = &json["stats"]["all"]["prev1"];
        assert_eq!(prev1["requests"], 40);
        assert_eq!(prev1["startofminute_epoch"], 1537724040);
        assert!(prev1.get("rate").is_none());
        let prev2 = &json["stats"]["all"]["prev2"];
        assert_eq!(prev2["requests"], 0);
        assert_eq!(prev2["latency_ms"], 0.0);
        assert_eq!(prev2["startofminute_epoch"], 1537723980);
    }

    #[test]
    fn single_stats_puts_the_windows_directly_under_stats() {
        let mut report = Report::new(60, 120.0, 2).unwrap();
        let json: Value = serde_json::from_str(report.json(1.0, 2.0, true)).unwrap();
        assert_eq!(json["stats"]["current"]["requests"], 0);
        assert_eq!(json["stats"]["prev2"]["startofminute_epoch"], 0);

        report.add(b"login", vec![histogram(&[3.0])], total(&[3.0]));
        let json: Value = serde_json::from_str(report.json(1.0, 2.0, true)).unwrap();
        assert_eq!(json["stats"]["current"]["requests"], 1);
    }

    #[test]
    fn keys_are_escaped_in_json_and_in_prometheus() {
        let mut report = Report::new(60, 120.0, 1).unwrap();
        let nasty = "a\"b\\c\nd|e</script>\u{1}é";
        report.add(nasty.as_bytes(), vec![], total(&[4.0, 40.0, 4000.0]));

        let json: Value = serde_json::from_str(report.json(0.0, 0.0, false)).unwrap();
        assert!(json["stats"][nasty].is_object());

        let text = report.prometheus("d\"x").to_string();
        let labels = "dict=\"d\\\"x\",key=\"a\\\"b\\\\c\\nd|e</script>\u{1}é\"";
        assert!(
            text.contains(&format!("resty_requests_total{{{}}} 3\n", labels)),
            "{}",
            text
        );
        assert!(text.contains(&format!(
            "resty_request_latency_seconds_bucket{{{},le=\"0.005\"}} 1\n",
            labels
        )));
        assert!(text.contains(&format!(
            "resty_request_latency_seconds_bucket{{{},le=\"0.05\"}} 2\n",
            labels
        )));
        assert!(text.contains(&format!(
            "resty_request_latency_seconds_bucket{{{},le=\"+Inf\"}} 3\n",
            labels
        )));
        assert!(text.contains(&format!(
            "resty_request_latency_seconds_sum{{{}}} 4.044\n",
            labels
        )));
    }

    /// A report of `keys` keys (in no order, some escaped), three windows.
    fn report_of(keys: usize, key_info: bool) -> Report {
        let mut report = Report::new(60, 1537724115.5, 2).unwrap();
        for i in (0..keys).rev() {
            let key = format!("/k/{}\"\\\u{1}é{}", i % 7, i);
            let latencies: Vec<f64> = (0..i % 5).map(|j| (i * j) as f64 * 0.7).collect();
            report.add(
                key.as_bytes(),
                vec![histogram(&latencies), histogram(&[1.0; 3])],
                total(&latencies),
            );
            // Runs of 3 keys and one of the rest, as a walk in steps
            // makes them: rendering merges them.
            if i % 3 == 0 && i > 2 {
                report.end_run();
            }
        }
        if key_info {
            report.set_key_info(KeyInfo {
                tracked: keys as u64,
                max_keys: 1000,
                overflow_key: "_over\"flow".to_string(),
                engine: Some(EngineMemory {
                    used_bytes: 4096,
                    bytes: 8192,
                }),
                admission: None,
            });
        }
        report
    }

    /// Renders in steps of `step` keys: the text and the number of steps.
    fn in_steps(report: &mut Report, step: usize) -> (String, usize) {
        let mut text = Vec::new();
        let mut steps = 1;
        while !report.render(step) {
            text.extend_from_slice(report.text());
            report.clear_text();
            steps += 1;
        }
        text.extend_from_slice(report.text());
        (String::from_utf8(text).unwrap(), steps)
    }

    #[test]
    fn json_in_steps_is_serde_json_of_the_whole_report() {
        for (keys, key_info) in [(0, false), (1, true), (7, false), (40, true)] {
            let whole = {
                let mut report = report_of(keys, key_info);
                report.sort();
                let view = ReportView {
                    report: &report,
                    free_space: 4096.0,
                    capacity: 16384.0,
                    single: false,
                };
                serde_json::to_string(&view).unwrap()
            };
            for step in [1, 3, 40, usize::MAX] {
                let mut report = report_of(keys, key_info);
                report.begin_json(4096.0, 16384.0, false);
                let (text, steps) = in_steps(&mut report, step);
                assert_eq!(text, whole, "{} keys, steps of {}", keys, step);
                assert_eq!(steps, keys.saturating_sub(1) / step + 1);
            }
            // single_stats: one step, whatever the step.
            let mut report = report_of(keys, key_info);
            report.sort();
            let view = ReportView {
                report: &report,
                free_space: 1.0,
                capacity: 2.0,
                single: true,
            };
            let single = serde_json::to_string(&view).unwrap();
            report.begin_json(1.0, 2.0, true);
            assert_eq!(in_steps(&mut report, 1), (single, 1));
        }
    }

    #[test]
    fn prometheus_in_steps_is_the_text_in_one() {
        for keys in [0, 1, 7, 40] {
            let whole = report_of(keys, true).prometheus("d\"x").to_string();
            assert_eq!(whole.matches("_bucket{").count(), keys * 12);
            for step in [1, 2, 7, 39, 40, usize::MAX] {
                let mut report = report_of(keys, true);
                report.begin_prometheus("d\"x");
                let (text, _) = in_steps(&mut report, step);
                assert_eq!(text, whole, "{} keys, steps of {}", keys, step);
            }
        }
        // Keys in byte order, in each of the three sections.
        let text = report_of(40, false).prometheus("d").to_string();
        let keys: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("resty_requests_window_rate{"))
            .map(|line| line.split("key=").nth(1).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 40);
    }

    /// Renders `report` (begun) in pieces of `max_bytes` and steps of
    /// `step` keys, each piece's text taken: the pieces, and the keys
    /// rendered in all.
    fn in_pieces(report: &mut Report, step: usize, max_bytes: usize) -> (Vec<Vec<u8>>, usize) {
        let (mut pieces, mut keys) = (Vec::new(), 0);
        loop {
            let (done, rendered) = report.render_upto(step, max_bytes);
            assert!(rendered >= 1 && rendered <= step, "{}", rendered);
            keys += rendered;
            pieces.push(report.text().to_vec());
            report.clear_text();
            if done {
                return (pieces, keys);
            }
        }
    }

    #[test]
    fn pieces_by_bytes_make_the_same_text() {
        let keys = 40;
        for prometheus in [false, true] {
            let begin = |report: &mut Report| {
                if prometheus {
                    report.begin_prometheus("d\"x");
                } else {
                    report.begin_json(4096.0, 16384.0, false);
                }
            };
            let mut whole = report_of(keys, true);
            begin(&mut whole);
            assert!(whole.render(usize::MAX));
            let whole = whole.text().to_vec();
            // The longest text of one key in one section, with a section's
            // header or the end: no piece goes further past the limit.
            let mut one = report_of(keys, true);
            begin(&mut one);
            let (singles, _) = in_pieces(&mut one, 1, usize::MAX);
            let longest = singles.iter().map(Vec::len).max().unwrap_or(0);
            assert_eq!(singles.concat(), whole);
            for max_bytes in [1, 100, 1000, 4096, usize::MAX] {
                for step in [1, 7, usize::MAX] {
                    let mut report = report_of(keys, true);
                    begin(&mut report);
                    let (pieces, rendered) = in_pieces(&mut report, step, max_bytes);
                    let what = format!("{} bytes, {} keys a step", max_bytes, step);
                    assert_eq!(pieces.concat(), whole, "{}", what);
                    let sections = if prometheus { 3 } else { 1 };
                    assert_eq!(rendered, keys * sections, "{}", what);
                    let last = pieces.len() - 1;
                    for (i, piece) in pieces.iter().enumerate() {
                        assert!(piece.len() < max_bytes.saturating_add(longest), "{}", what);
                        // Only the key limit, or the end, ends a piece
                        // short of max_bytes.
                        if step == usize::MAX && i < last {
                            assert!(piece.len() >= max_bytes, "{}: {}", what, i);
                        }
                    }
                }
            }
            // Text already over the limit (not taken): still a key a call.
            let mut report = report_of(keys, true);
            begin(&mut report);
            let mut calls = 0;
            loop {
                calls += 1;
                let (done, rendered) = report.render_upto(usize::MAX, 1);
                assert_eq!(rendered, 1);
                if done {
                    break;
                }
            }
            assert_eq!(calls, keys * if prometheus { 3 } else { 1 });
            assert_eq!(report.text(), &whole[..]);
        }
    }

    /// The Prometheus text as the renderer wrote it before it was made
    /// fast (format! of each line): what the fast one must write byte for
    /// byte.
    fn prometheus_by_format(report: &mut Report, dict: &str) -> String {
        fn label(value: &str) -> String {
            let mut out = Vec::new();
            escape_label(&mut out, value);
            String::from_utf8(out).unwrap()
        }
        report.sort();
        let order = report.buf.order.clone();
        let mut text = String::new();
        for (section, header) in PROMETHEUS_SECTIONS.iter().enumerate() {
            text.push_str(header);
            for &entry in &order {
                let entry = entry as usize;
                let labels = format!(
                    "{{dict=\"{}\",key=\"{}\"",
                    label(dict),
                    label(report.key(entry))
                );
                let e = report.buf.entries[entry];
                let n = report.edges.len();
                match section {
                    0 => text.push_str(&format!("resty_requests_total{}}} {}\n", labels, e.count)),
                    1 => {
                        let below = &report.buf.at_or_below[entry * n..(entry + 1) * n];
                        for (le, count) in report.edges.iter().zip(below) {
                            text.push_str(&format!(
                                "resty_request_latency_seconds_bucket{},le=\"{}\"}} {}\n",
                                labels, le, count
                            ));
                        }
                        text.push_str(&format!(
                            "resty_request_latency_seconds_bucket{},le=\"+Inf\"}} {}\n",
                            labels, e.count
                        ));
                        text.push_str(&format!(
                            "resty_request_latency_seconds_sum{}}} {}\n",
                            labels,
                            e.sum / 1000.0
                        ));
                        text.push_str(&format!(
                            "resty_request_latency_seconds_count{}}} {}\n",
                            labels, e.count
                        ));
                    }
                    _ => {
                        let w = report.windows(entry);
                        text.push_str(&format!(
                            "resty_requests_window_rate{},window=\"{}\"}} {}\n",
                            labels,
                            report.window,
                            report.rate(&w[0], w.get(1))
                        ));
                    }
                }
            }
        }
        if let Some(info) = &report.key_info {
            let mut gauges = vec![(
                "resty_requests_tracked_keys",
                "Request keys tracked, of max_keys.",
                info.tracked,
            )];
            if let Some(engine) = &info.engine {
                gauges.push((
                    "resty_requests_engine_used_bytes",
                    "Bytes of the dict's shared engine in records, free ones included.",
                    engine.used_bytes,
                ));
                gauges.push((
                    "resty_requests_engine_bytes",
                    "Size of the dict's shared engine.",
                    engine.bytes,
                ));
            }
            for (name, help, value) in gauges {
                text.push_str(&format!(
                    "# HELP {} {}\n# TYPE {} gauge\n{}{{dict=\"{}\"}} {}\n",
                    name,
                    help,
                    name,
                    name,
                    label(dict),
                    value
                ));
            }
        }
        text
    }

    #[test]
    fn prometheus_text_is_what_format_wrote() {
        for keys in [0, 1, 7, 40] {
            let mut report = report_of(keys, true);
            let reference = prometheus_by_format(&mut report, "d\"x\n");
            assert_eq!(report.prometheus("d\"x\n"), reference, "{} keys", keys);
        }
        // Sums and rates of every size, fractions, zero and huge.
        let mut report = Report::new(7, 1537724115.3, 1).unwrap();
        report.set_edges(&[1e-6, 0.3, 1e9]).unwrap();
        for (i, sum) in [0.0, 1e-9, 0.1, 12.0, 1e15, 1.5e21, 123.456, 3e-5, f64::MAX]
            .iter()
            .enumerate()
        {
            let mut h = Histogram::new();
            h.record(*sum);
            let now = Summary::of(&h);
            report.add_parts(
                format!("k{}", i).as_bytes(),
                &[now, now],
                i as u64,
                *sum,
                &[1, 2],
            );
        }
        let reference = prometheus_by_format(&mut report, "d");
        assert_eq!(report.prometheus("d"), reference);
        assert!(reference.contains("le=\"0.000001\"} 1\n"), "{}", reference);
        assert!(
            reference.contains("le=\"1000000000\"} 0\n"),
            "{}",
            reference
        );
    }

    /// The Prometheus text's numbers as Rust's `{}` writes them; the
    /// JSON's as C's `"%.14g"` rounds them (see [`json_f64`]), in
    /// serde_json's notation.
    #[test]
    fn numbers_are_written_as_rust_and_serde_json_write_them() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            0.5,
            1e15,
            1e16,
            1e17,
            1e-5,
            1e-7,
            123456789.0,
            0.1 + 0.2,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            -f64::INFINITY,
        ];
        // The short decimals' edges: m / 10^k of every length and scale,
        // their neighbours one ulp away, powers of ten and the bounds of
        // the fast paths (1e-4, 1e15), of both signs.
        let mut edges = Vec::new();
        for k in 0..=20 {
            let p = 10f64.powi(k);
            for m in [
                1.0,
                5.0,
                12.0,
                999.0,
                13825.0,
                123456789012345.0,
                999999999999999.0,
            ] {
                edges.extend([m / p, m * p, (m + 0.5) / p]);
            }
            edges.extend([p, 1.0 / p, 0.1 + p, 1e15 - 1.0 / p, 1e-4 + 1.0 / p / 1e4]);
        }
        for v in edges {
            for v in [v, -v] {
                let bits = v.to_bits();
                values.extend([v, f64::from_bits(bits + 1), f64::from_bits(bits - 1)]);
            }
        }
        for _ in 0..200_000 {
            let bits = next();
            values.push(f64::from_bits(bits));
            // Latencies' sums and rates: ms over 1000, a few digits.
            values.push((bits % 10_000_000) as f64 / 1000.0 / 1000.0);
            values.push((bits % 100_000) as f64 * 0.37);
        }
        for v in values {
            let mut out = Vec::new();
            push_display_f64(&mut out, v);
            assert_eq!(out, format!("{}\n", v).into_bytes(), "{:e}", v);
            let mut out = Vec::new();
            json_f64(&mut out, v);
            assert_eq!(out, serde_json::to_vec(&c_g14(v)).unwrap(), "{:e}", v);
            let mut out = Vec::new();
            push_u64(&mut out, v.to_bits());
            assert_eq!(out, format!("{}\n", v.to_bits()).into_bytes());
            // Whole numbers near the fast paths' bound, of both signs.
            let whole = ((v.to_bits() % 4_000_000_000_000_000) as f64) - 2e15;
            let mut out = Vec::new();
            push_display_f64(&mut out, whole);
            assert_eq!(out, format!("{}\n", whole).into_bytes());
            let mut out = Vec::new();
            json_f64(&mut out, whole);
            let want = serde_json::to_vec(&c_g14(whole)).unwrap();
            assert_eq!(out, want, "{:e}", whole);
        }
    }

    #[test]
    fn json_numbers_have_14_digits_as_cjson_writes_them() {
        let json = |value: f64| {
            let mut out = Vec::new();
            json_f64(&mut out, value);
            String::from_utf8(out).unwrap()
        };
        for (value, text) in [
            // Seconds times 1000, and a mean of such: the arithmetic's
            // digits past the 14th are not shown.
            (1.001 * 1000.0, "1001.0"),
            (1000.9999999999999, "1001.0"),
            (1278.4 / 7.0, "182.62857142857"),
            (861.5384615384615, "861.53846153846"),
            (13.825, "13.825"),
            (33.0, "33.0"),
            (0.12890625, "0.12890625"),
            // Exact ties at the 15th digit go to the even 14th.
            (12345678901234.5, "12345678901234.0"),
            (12345678901235.5, "12345678901236.0"),
            (1234567890123.25, "1234567890123.2"),
            (123456789012345.0, "123456789012340.0"),
            (123456789012355.0, "123456789012360.0"),
            // Carried to the next power of ten.
            (9.999999999999996, "10.0"),
            (99999999999999.7, "100000000000000.0"),
            (f64::from_bits(1e-4f64.to_bits() - 1), "0.0001"),
            (999999999999999.7, "1000000000000000.0"),
            (1e-5 + 1e-19, "0.00001"),
            (1e-7 + 1e-21, "1e-7"),
            (-1000.9999999999999, "-1001.0"),
            (f64::NAN, "null"),
        ] {
            assert_eq!(json(value), text, "{:e}", value);
        }
        // Dyadic numbers of few bits (many exact ties at the 15th digit),
        // and their neighbours, at every scale: C's rounding, exactly.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let bits = 1 + (rng >> 40) % 24;
            let i = ((rng >> 8) % (1 << bits)) | 1;
            let v = i as f64 / f64::powi(2.0, (rng % 64) as i32 - 10);
            let v = v * f64::powi(10.0, (rng >> 61) as i32 * 4 - 12);
            for v in [
                v,
                f64::from_bits(v.to_bits() + 1),
                f64::from_bits(v.to_bits() - 1),
            ] {
                let want = serde_json::to_string(&c_g14(v)).unwrap();
                assert_eq!(json(v), want, "{:e}", v);
            }
        }
    }

    #[test]
    fn eight_digits_are_the_decimal_digits() {
        let text = |v: u32| eight_digits(v).to_le_bytes();
        let check = |v: u32| assert_eq!(text(v), *format!("{:08}", v).as_bytes(), "{}", v);
        // Every value of each half (the lanes split at 10^4), and spread
        // values of both.
        for v in 0..10_000 {
            check(v);
            check(v * 10_000);
            check(v * 10_000 + 9_999 - v);
        }
        for v in (0..100_000_000)
            .step_by(9_973)
            .chain([99_999_999, 10_000_000])
        {
            check(v);
        }
    }

    #[test]
    fn short_decimals_are_found_where_they_exist() {
        // The fast path is taken for the figures it is there for (rates,
        // sums in seconds), not for the decimals of 16 or 17 digits.
        assert_eq!(short_decimal(13.825), Some((false, 13825, 3)));
        assert_eq!(short_decimal(0.012), Some((false, 12, 3)));
        assert_eq!(short_decimal(-0.0001), Some((true, 1, 4)));
        assert_eq!(
            short_decimal(123456789.012345),
            Some((false, 123456789012345, 6))
        );
        assert_eq!(short_decimal(0.1 + 0.2), None);
        assert_eq!(short_decimal(12.0), None);
        assert_eq!(short_decimal(9.9e-5), None);
        assert_eq!(short_decimal(1e15 + 0.5), None);
        // Every decimal of 15 digits or fewer (not whole, 1e-4 or more) is
        // found: m / 10^k, its trailing zeros dropped.
        let mut rng = 0x853c_49e6_748f_ea9bu64;
        for _ in 0..300_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut m = rng % POW10[1 + (rng >> 59) as usize % 15];
            let mut k = 1 + (rng >> 32) as usize % 19;
            let value = m as f64 / 10f64.powi(k as i32);
            while k > 0 && m % 10 == 0 {
                m /= 10;
                k -= 1;
            }
            if k == 0 || value < 1e-4 {
                continue;
            }
            assert_eq!(short_decimal(value), Some((false, m, k)), "{}", value);
            assert_eq!(short_decimal(-value), Some((true, m, k)), "{}", value);
        }
        for (value, text) in [(0.5, "0.5"), (1.25e-4, "0.000125"), (-7.05, "-7.05")] {
            let mut out = Vec::new();
            json_f64(&mut out, value);
            assert_eq!(out, text.as_bytes());
        }
        // Integers of every length.
        for value in POW10
            .iter()
            .flat_map(|&p| [p - 1, p, p + 1])
            .chain([u64::MAX])
        {
            let mut out = Vec::new();
            put_u64(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
            let signed = value as i64;
            let mut out = Vec::new();
            put_i64(&mut out, signed);
            assert_eq!(out, signed.to_string().into_bytes());
        }
        let mut out = Vec::new();
        put_i64(&mut out, i64::MIN);
        assert_eq!(out, i64::MIN.to_string().into_bytes());
    }

    #[test]
    fn pieces_of_every_length_are_copied_whole() {
        let source: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        for n in 0..=source.len() {
            // After a few bytes, so that no piece starts aligned.
            let mut out = b"xyz".to_vec();
            put(&mut out, &source[..n]);
            put(&mut out, &source[n / 2..n]);
            let mut want = b"xyz".to_vec();
            want.extend_from_slice(&source[..n]);
            want.extend_from_slice(&source[n / 2..n]);
            assert_eq!(out, want, "{} bytes", n);
        }
    }

    /// The keys of a Prometheus text, in the order of its first section.
    fn keys_in(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("resty_requests_total{dict=\"d\",key=\""))
            .map(|rest| rest[..rest.rfind("\"}").unwrap()].to_string())
            .collect()
    }

    #[test]
    fn keys_are_in_byte_order_whatever_prefix_they_share() {
        // Keys of a few bytes of a small alphabet (zero bytes among them),
        // many sharing a long prefix, some a prefix of others, some equal
        // in their first 8 bytes after the prefix: each run's sort keys
        // (8 bytes after the run's common prefix) tie, differ and run out.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for case in 0..200 {
            let prefix = ["", "/api/v1/", "/api/v1/users/0000000"][case % 3];
            let mut report = Report::new(60, 120.0, 0).unwrap();
            let mut keys = Vec::new();
            for _ in 0..1 + next(60) {
                let mut key = prefix.to_string();
                for _ in 0..next(14) {
                    key.push(['a', 'b', '\0', '/', 'é'][next(5) as usize]);
                }
                report.add(key.as_bytes(), vec![histogram(&[1.0])], total(&[1.0]));
                keys.push(key);
                if next(8) == 0 {
                    report.end_run();
                }
            }
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys_in(report.prometheus("d")), keys, "case {}", case);
        }
    }

    #[test]
    fn a_report_renders_the_same_in_buffers_another_left() {
        // Reports of every size made and freed one after another (their
        // buffers kept for the next), some freed half rendered: each
        // renders what the reference writes of it.
        for keys in [40, 3, 0, 25, 40, 1] {
            let mut report = report_of(keys, true);
            let reference = prometheus_by_format(&mut report, "d");
            assert_eq!(report.prometheus("d"), reference, "{} keys", keys);
            let mut half = report_of(keys + 5, false);
            half.begin_json(1.0, 2.0, false);
            half.render(2);
            drop(half);
            let mut report = report_of(keys, false);
            let mut again = report_of(keys, false);
            let json = again.json(1.0, 2.0, false).to_string();
            assert_eq!(report.json(1.0, 2.0, false), json);
            assert_eq!(keys_in(report.prometheus("d")).len(), keys);
        }
    }

    #[test]
    fn a_key_added_again_replaces_the_one_before() {
        let mut report = Report::new(60, 120.0, 0).unwrap();
        report.add(b"b", vec![histogram(&[1.0])], total(&[1.0]));
        report.add(b"b", vec![histogram(&[5.0])], total(&[5.0]));
        report.end_run();
        report.add(b"a", vec![histogram(&[2.0])], total(&[2.0]));
        report.add(b"b", vec![histogram(&[9.0])], total(&[9.0]));
        report.end_run();
        report.add(b"b", vec![histogram(&[3.0, 4.0])], total(&[3.0, 4.0]));
        let json: Value = serde_json::from_str(report.json(0.0, 0.0, false)).unwrap();
        assert_eq!(json["stats"]["b"]["current"]["requests"], 2);
        assert_eq!(json["stats"].as_object().unwrap().len(), 2);
        let text = report.prometheus("d");
        assert_eq!(text.matches("resty_requests_total{").count(), 2);
        assert!(text.contains("resty_requests_total{dict=\"d\",key=\"b\"} 2\n"));
    }

    #[test]
    fn edges_are_set_before_keys_only() {
        let mut report = Report::new(60, 120.0, 0).unwrap();
        assert_eq!(report.set_edges(&[]).unwrap_err(), Error::BadArgument);
        assert_eq!(
            report.set_edges(&[2.0, 1.0]).unwrap_err(),
            Error::BadArgument
        );
        report.set_edges(&[0.25, 4.0]).unwrap();
        report.add(
            b"k",
            vec![],
            Total {
                count: 3,
                sum: 5000.0,
                at_or_below: vec![1, 2],
            },
        );
        assert_eq!(report.set_edges(&[1.0]).unwrap_err(), Error::BadArgument);
        let text = report.prometheus("d").to_string();
        assert_eq!(text.matches("_bucket{").count(), 3);
        assert!(text.contains("key=\"k\",le=\"0.25\"} 1\n"), "{}", text);
        assert!(text.contains("key=\"k\",le=\"4\"} 2\n"), "{}", text);
        assert!(text.contains("key=\"k\",le=\"+Inf\"} 3\n"), "{}", text);
        assert!(text.contains("_sum{dict=\"d\",key=\"k\"} 5\n"), "{}", text);
    }

    #[test]
    fn prometheus_text_per_key_is_as_the_readme_says() {
        // (E + 5) lines labelled {dict="D",key="K"} (15 + |D| + |K| bytes
        // each, escaped), 185 + 45 E bytes of names and punctuation, the
        // `le` values and the numbers' digits (E + 3 counts, the sum, the
        // window, the rate).
        let headers: usize = PROMETHEUS_SECTIONS.iter().map(|h| h.len()).sum();
        let defaults: Vec<f64> = DEFAULT_EDGES_S.to_vec();
        for edges_s in [defaults, vec![0.1, 0.5, 2.0]] {
            let edges = edges_s.len();
            let le: usize = edges_s.iter().map(|e| format!("{}", e).len()).sum();
            for (dict, key) in [("d", "k"), ("bench_stats_0_100000", "/path/12345")] {
                let mut report = Report::new(60, 90.0, 1).unwrap();
                report.set_edges(&edges_s).unwrap();
                let below: Vec<u64> = edges_s.iter().map(|&e| u64::from(e >= 0.012)).collect();
                let total = Total {
                    count: 1,
                    sum: 12.0,
                    at_or_below: below,
                };
                report.add(key.as_bytes(), vec![histogram(&[12.0])], total);
                let text = report.prometheus(dict).to_string();
                // Counts 1 (or 0 below 12 ms), sum 0.012, window 60, rate 1.
                let digits = (edges + 3) + "0.012".len() + "60".len() + "1".len();
                let per_key =
                    (edges + 5) * (15 + dict.len() + key.len()) + 185 + 45 * edges + le + digits;
                assert_eq!(text.len() - headers, per_key, "{}", text);
                if dict.len() == 20 {
                    // The docs' examples: 1,473 and 709 bytes.
                    assert_eq!(per_key, if edges == 11 { 1473 } else { 709 });
                }
            }
            if edges == 11 {
                // The docs' figures: 955 + 16 (|D| + |K|) bytes and the
                // digits with the 11 default edges.
                assert_eq!(le, 35);
                assert_eq!(16 * 15 + 185 + 45 * 11 + le, 955);
            }
        }
    }

    /// A report as the engine's walk fills it for `scrape_timing` (in
    /// src/ffi_engine.rs): keys "/path/1".. in the order made, one request
    /// of 12 ms each or, `busy`, 7 in each of three windows; with the
    /// windows' percentiles or without (Prometheus).
    fn walked_like(keys: usize, busy: bool, percentiles: bool) -> Report {
        let mut report = Report::new(60, 27_000_000.0 * 60.0 + 1.5, 2).unwrap();
        if !percentiles {
            report.without_percentiles();
        }
        report.reserve_keys(keys);
        let mut latencies = Vec::new();
        for i in 1..=keys {
            latencies.clear();
            if busy {
                for ms in [1.1, 4.0, 12.0, 30.0, 90.0, 250.0, 800.0] {
                    latencies.push(ms * (1.0 + (i % 13) as f64 / 13.0));
                }
            } else {
                latencies.push(12.0);
            }
            let window = if percentiles {
                histogram(&latencies)
            } else {
                let h = histogram(&latencies);
                Summary::without_buckets(h.count, h.sum, h.max)
            };
            let windows = if busy {
                [window; 3]
            } else {
                [window, Summary::default(), Summary::default()]
            };
            let mut t = total(&latencies);
            if busy {
                t.count *= 3;
                t.sum *= 3.0;
                t.at_or_below.iter_mut().for_each(|n| *n *= 3);
            }
            let key = format!("/path/{}", i);
            report.add_parts(key.as_bytes(), &windows, t.count, t.sum, &t.at_or_below);
        }
        report
    }

    /// The calling thread's CPU time: steadier than wall time on a loaded
    /// machine, as time waiting for a CPU is not in it (for the timings).
    pub(crate) fn thread_cpu() -> std::time::Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock and a writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// Times the rendering alone (no walk), as the FFI renders it (begin,
    /// one render, the text), of the reports `scrape_timing` renders, best
    /// of 9: `cargo test --release --no-default-features --lib
    /// render_timing -- --ignored --nocapture` (SCRAPE_KEYS and
    /// SCRAPE_BUSY as there; SCRAPE_FORMAT=json or prometheus for one only,
    /// as under `perf record` for a profile of the text alone;
    /// SCRAPE_DUMP=path writes the texts to path.json and path.prometheus,
    /// to compare two builds' bytes; SCRAPE_STEP=n renders n keys a step,
    /// each step's text copied out then cleared, as `write` gets it).
    #[test]
    #[ignore]
    fn render_timing() {
        let var = |name| std::env::var(name).ok();
        let keys = var("SCRAPE_KEYS")
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        let busy = var("SCRAPE_BUSY").is_some();
        let format = var("SCRAPE_FORMAT").unwrap_or_default();
        let step = var("SCRAPE_STEP").and_then(|n| n.parse().ok());
        // Wall time, and the thread's CPU time (steadier on a loaded
        // machine: time waiting for a CPU is not in it).
        let cpu = thread_cpu;
        let mut best = [std::time::Duration::MAX; 2];
        let mut best_cpu = best;
        let mut bytes = [0; 2];
        for _ in 0..9 {
            for (i, name) in ["json", "prometheus"].iter().enumerate() {
                if !format.is_empty() && format != *name {
                    continue;
                }
                let mut report = walked_like(keys, busy, i == 0);
                let (start, start_cpu) = (std::time::Instant::now(), cpu());
                if i == 0 {
                    report.begin_json(1.0, 2.0, false);
                } else {
                    report.begin_prometheus("bench_stats_0_100000");
                }
                match step {
                    Some(step) => {
                        let mut piece = Vec::new();
                        bytes[i] = 0;
                        loop {
                            let done = report.render(step);
                            piece.clear();
                            piece.extend_from_slice(report.text());
                            bytes[i] += piece.len();
                            report.clear_text();
                            if done {
                                break;
                            }
                        }
                    }
                    None => {
                        assert!(report.render(usize::MAX));
                        bytes[i] = report.text().len();
                    }
                }
                best[i] = best[i].min(start.elapsed());
                best_cpu[i] = best_cpu[i].min(cpu() - start_cpu);
                if let Some(path) = var("SCRAPE_DUMP") {
                    std::fs::write(format!("{}.{}", path, name), report.text()).unwrap();
                }
            }
        }
        let shown = |i: usize| match best[i] {
            std::time::Duration::MAX => "not timed".to_string(),
            wall => format!(
                "{:.1} ms, CPU {:.1} ({} B)",
                wall.as_secs_f64() * 1e3,
                best_cpu[i].as_secs_f64() * 1e3,
                bytes[i]
            ),
        };
        eprintln!(
            "{} keys{}: JSON {}; Prometheus {}",
            keys,
            if busy { " (busy)" } else { "" },
            shown(0),
            shown(1)
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(Report::new(0, 1.0, 2).unwrap_err(), Error::BadArgument);
        assert_eq!(
            Report::new(60, f64::NAN, 2).unwrap_err(),
            Error::BadArgument
        );
        assert_eq!(Report::new(60, 1.0, 65).unwrap_err(), Error::BadArgument);
        assert_eq!(Report::new(60, 1e300, 2).unwrap_err(), Error::BadArgument);
        assert_eq!(Report::new(60, -1.0, 2).unwrap_err(), Error::BadArgument);
    }
}
