//! Renders request records read from the shared engine: the JSON of
//! greencheek's request counter (with percentiles added) through
//! `serde_json`, and the Prometheus text exposition format.
//!
//! The engine's walk ([`crate::ffi_engine`]) hands the records over key by
//! key; rendering, escaping and the arithmetic happen here.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Bound::{Excluded, Unbounded};
use std::ops::Range;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::engine::requests::{Layout, Total};
use crate::error::Error;
use crate::histogram::{Summary, PROMETHEUS_EDGES_MS};

/// The most previous windows a report may show.
pub const MAX_PREVIOUS_WINDOWS: usize = 64;

/// The latest time a report accepts (epoch seconds, some 30 million years
/// from now): far past any clock, small enough for exact window arithmetic.
pub const MAX_NOW: f64 = 1e15;

#[derive(Debug)]
struct KeyRecords {
    /// The current window first, then the previous ones.
    windows: Vec<Summary>,
    /// Every request since the key was first recorded.
    total: Total,
}

/// What the report says about the key registry.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub tracked: u64,
    pub max_keys: u64,
    pub overflow_key: String,
    /// The engine's bytes in records (free ones included) and its size.
    pub engine: Option<EngineMemory>,
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
    /// The current window's index.
    pub current: u64,
    /// Index slots: all, and scanned so far.
    slots: usize,
    scanned: usize,
    offsets: Vec<u32>,
    next: usize,
}

impl Walk {
    pub fn new(engine: usize, layout: Layout, current: u64, slots: usize) -> Walk {
        Walk {
            engine,
            layout,
            current,
            slots,
            scanned: 0,
            offsets: Vec::new(),
            next: 0,
        }
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
        dict: String,
        edges: Vec<String>,
    },
}

/// Where a rendering in several steps stands: its format, the section
/// being written (Prometheus has three, each over every key) and the last
/// key written in it.
#[derive(Debug)]
struct Rendering {
    format: Format,
    section: usize,
    after: Option<String>,
}

/// One report being put together: keys are added (in any order, a few at
/// a time if need be), then the text is rendered (in steps of a few keys
/// if need be), by key.
#[derive(Debug)]
pub struct Report {
    window: u64,
    now: f64,
    previous: usize,
    /// By key: every worker renders the same text.
    keys: BTreeMap<String, KeyRecords>,
    key_info: Option<KeyInfo>,
    /// "current", "prev1", "prev2", ...
    window_names: Vec<String>,
    rendering: Option<Rendering>,
    rendered: Vec<u8>,
    /// The engine walk filling this report, when it takes several steps.
    pub walk: Option<Walk>,
}

impl Report {
    /// A report at time `now` (seconds) over windows of `window` seconds,
    /// showing `previous` windows before the current one.
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
            keys: BTreeMap::new(),
            key_info: None,
            window_names: (0..=previous)
                .map(|age| match age {
                    0 => "current".to_string(),
                    _ => format!("prev{}", age),
                })
                .collect(),
            rendering: None,
            rendered: Vec::new(),
            walk: None,
        })
    }

    /// The start (epoch seconds) of the window `age` windows before now.
    fn window_start(&self, age: usize) -> i64 {
        let current = (self.now / self.window as f64).floor() as i64;
        (current - age as i64) * self.window as i64
    }

    /// Adds a key's records: `windows` the current window first, then the
    /// previous ones (missing ones are empty, extra ones ignored). Bytes
    /// that are not UTF-8 are shown as U+FFFD (the shim refuses such keys,
    /// so this only guards against a foreign writer).
    pub fn add(&mut self, key: &[u8], mut windows: Vec<Summary>, total: Total) {
        windows.resize(self.previous + 1, Summary::default());
        self.keys.insert(
            String::from_utf8_lossy(key).into_owned(),
            KeyRecords { windows, total },
        );
    }

    /// How many windows before the current one the report shows.
    pub fn previous(&self) -> usize {
        self.previous
    }

    pub fn set_key_info(&mut self, info: KeyInfo) {
        self.key_info = Some(info);
    }

    /// The key info, once set.
    pub fn key_info_mut(&mut self) -> Option<&mut KeyInfo> {
        self.key_info.as_mut()
    }

    /// The sliding-window estimate of requests per window:
    /// `previous * ((window - elapsed) / window) + current`.
    fn rate(&self, current: &Summary, previous: Option<&Summary>) -> f64 {
        let window = self.window as f64;
        let elapsed = self.now - self.window_start(0) as f64;
        let carried = previous.map_or(0.0, |p| p.count as f64 * ((window - elapsed) / window));
        carried + current.count as f64
    }

    /// Starts rendering the JSON of `stats` (every key) or, with `single`,
    /// of `single_stats` (the first key's windows directly under "stats",
    /// all zero when no key was added), written whole by this call. Then
    /// [`Report::render`] writes the keys. Streamed by `serde_json`, with
    /// no tree built first: byte for byte what `serde_json::to_writer`
    /// writes of the whole report.
    pub fn begin_json(&mut self, free_space: f64, capacity: f64, single: bool) {
        let mut out = Vec::with_capacity(256 + self.keys.len().min(1 << 16) * 512);
        let info = DictInfo {
            free_space,
            capacity,
        };
        // Writing to a Vec cannot fail, and every number is finite or null.
        out.extend_from_slice(b"{\"shared_dict_info\":");
        let _ = serde_json::to_writer(&mut out, &info);
        out.extend_from_slice(b",\"stats\":");
        if single {
            let windows = self.single_windows();
            let _ = serde_json::to_writer(
                &mut out,
                &KeyView {
                    report: self,
                    windows: &windows,
                },
            );
            self.json_end(&mut out);
            self.rendering = None;
        } else {
            out.push(b'{');
            self.rendering = Some(Rendering {
                format: Format::Json,
                section: 0,
                after: None,
            });
        }
        self.rendered = out;
    }

    /// What `single_stats` shows: the first key's windows, all zero when
    /// no key was added.
    fn single_windows(&self) -> Vec<Summary> {
        self.keys.values().next().map_or_else(
            || vec![Summary::default(); self.previous + 1],
            |k| k.windows.clone(),
        )
    }

    fn json_end(&self, out: &mut Vec<u8>) {
        if let Some(info) = &self.key_info {
            out.extend_from_slice(b",\"key_info\":");
            let _ = serde_json::to_writer(&mut *out, info);
        }
        out.push(b'}');
    }

    /// Starts rendering the Prometheus text exposition format: requests as
    /// a counter and latency as a histogram (both since the key was first
    /// recorded), the sliding-window rate as a gauge; every sample
    /// labelled with the dict and the key. [`Report::render`] writes it.
    pub fn begin_prometheus(&mut self, dict: &str) {
        // Some 14 lines a key.
        let mut out = Vec::with_capacity(512 + self.keys.len().min(1 << 16) * 1400);
        out.extend_from_slice(PROMETHEUS_SECTIONS[0].as_bytes());
        self.rendered = out;
        let edges = PROMETHEUS_EDGES_MS
            .iter()
            .map(|le| format!(",le=\"{}\"}} ", le / 1000.0))
            .collect();
        self.rendering = Some(Rendering {
            format: Format::Prometheus {
                dict: escape_label(dict),
                edges,
            },
            section: 0,
            after: None,
        });
    }

    /// Renders up to `max_keys` more keys (at least one) of what
    /// [`Report::begin_json`] or [`Report::begin_prometheus`] began: true
    /// when the text is whole. A step that stops short frees the keys
    /// whose last section it wrote: a report rendered in steps renders
    /// once.
    pub fn render(&mut self, max_keys: usize) -> bool {
        let mut out = std::mem::take(&mut self.rendered);
        let done = self.render_into(&mut out, max_keys.max(1));
        self.rendered = out;
        if done {
            self.rendering = None;
        }
        done
    }

    fn render_into(&mut self, out: &mut Vec<u8>, max_keys: usize) -> bool {
        let (format, mut section, mut after) = match self.rendering.take() {
            Some(r) => (r.format, r.section, r.after),
            None => return true,
        };
        let sections = match format {
            Format::Json => 1,
            Format::Prometheus { .. } => PROMETHEUS_SECTIONS.len(),
        };
        let mut left = max_keys;
        while section < sections {
            let keys = match &after {
                Some(key) => self
                    .keys
                    .range::<str, _>((Excluded(key.as_str()), Unbounded)),
                None => self.keys.range::<str, _>(..),
            };
            let mut last = None;
            for (key, records) in keys {
                if left == 0 {
                    break;
                }
                left -= 1;
                match &format {
                    Format::Json => {
                        if after.is_some() || last.is_some() {
                            out.push(b',');
                        }
                        let _ = serde_json::to_writer(&mut *out, key);
                        out.push(b':');
                        let _ = serde_json::to_writer(
                            &mut *out,
                            &KeyView {
                                report: self,
                                windows: &records.windows,
                            },
                        );
                    }
                    Format::Prometheus { dict, edges } => {
                        self.prometheus_key(out, section, dict, edges, key, records)
                    }
                }
                last = Some(key);
            }
            if left == 0 {
                if let Some(last) = last {
                    let last = last.clone();
                    // More keys after it in this section?
                    let next = self
                        .keys
                        .range::<str, _>((Excluded(last.as_str()), Unbounded))
                        .next()
                        .map(|(key, _)| key.clone());
                    if let Some(next) = next {
                        if section + 1 == sections {
                            // Written for the last time: freed now, a step
                            // at a time, not all at the report's end.
                            self.keys = self.keys.split_off(next.as_str());
                        }
                        self.rendering = Some(Rendering {
                            format,
                            section,
                            after: Some(last),
                        });
                        return false;
                    }
                }
            }
            // The section is whole.
            section += 1;
            after = None;
            match &format {
                Format::Json => {
                    out.push(b'}');
                    self.json_end(out);
                }
                Format::Prometheus { dict, .. } => {
                    if let Some(header) = PROMETHEUS_SECTIONS.get(section) {
                        out.extend_from_slice(header.as_bytes());
                    } else {
                        self.prometheus_gauges(out, dict);
                    }
                }
            }
            if section < sections && left == 0 {
                self.rendering = Some(Rendering {
                    format,
                    section,
                    after: None,
                });
                return false;
            }
        }
        true
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
    }

    /// One key's lines of Prometheus section `section`.
    fn prometheus_key(
        &self,
        out: &mut Vec<u8>,
        section: usize,
        dict: &str,
        edges: &[String],
        key: &str,
        records: &KeyRecords,
    ) {
        let labels = format!("{{dict=\"{}\",key=\"{}\"", dict, escape_label(key));
        let labels = labels.as_bytes();
        let mut line = |name: &[u8], rest: std::fmt::Arguments| {
            out.extend_from_slice(name);
            out.extend_from_slice(labels);
            let _ = out.write_fmt(rest);
        };
        match section {
            0 => line(
                b"resty_requests_total",
                format_args!("}} {}\n", records.total.count),
            ),
            1 => {
                let total = &records.total;
                for (below, edge) in total.at_or_below.iter().zip(edges) {
                    line(
                        b"resty_request_latency_seconds_bucket",
                        format_args!("{}{}\n", edge, below),
                    );
                }
                line(
                    b"resty_request_latency_seconds_bucket",
                    format_args!(",le=\"+Inf\"}} {}\n", total.count),
                );
                line(
                    b"resty_request_latency_seconds_sum",
                    format_args!("}} {}\n", total.sum / 1000.0),
                );
                line(
                    b"resty_request_latency_seconds_count",
                    format_args!("}} {}\n", total.count),
                );
            }
            _ => {
                let rate = self.rate(&records.windows[0], records.windows.get(1));
                line(
                    b"resty_requests_window_rate",
                    format_args!(",window=\"{}\"}} {}\n", self.window, rate),
                );
            }
        }
    }

    /// The text rendered so far (whole once [`Report::render`] said so),
    /// since the last [`Report::clear_text`].
    pub fn text(&self) -> &[u8] {
        &self.rendered
    }

    /// Forgets the text rendered so far (it was handed on): a report
    /// rendered in steps then holds one step's text at a time.
    pub fn clear_text(&mut self) {
        self.rendered.clear();
    }

    /// The JSON of `stats` (or `single_stats`), rendered in one step.
    pub fn json(&mut self, free_space: f64, capacity: f64, single: bool) -> &str {
        self.begin_json(free_space, capacity, single);
        self.render(usize::MAX);
        // serde_json writes UTF-8 only.
        std::str::from_utf8(&self.rendered).unwrap_or_default()
    }

    /// The Prometheus text, rendered in one step.
    pub fn prometheus(&mut self, dict: &str) -> &str {
        self.begin_prometheus(dict);
        self.render(usize::MAX);
        // Keys and the dict's name are UTF-8 (lossy), the rest ASCII.
        std::str::from_utf8(&self.rendered).unwrap_or_default()
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

struct KeyView<'a> {
    report: &'a Report,
    windows: &'a [Summary],
}

struct WindowView<'a> {
    report: &'a Report,
    windows: &'a [Summary],
    age: usize,
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
        map.end()
    }
}

impl Serialize for KeyView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.windows.len()))?;
        for age in 0..self.windows.len() {
            map.serialize_entry(
                &self.report.window_names[age],
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
        map.serialize_entry("requests", &h.count)?;
        map.serialize_entry("latency_ms", &h.mean())?;
        map.serialize_entry("startofminute_epoch", &report.window_start(self.age))?;
        // null when the engine keeps no histograms (too small for them).
        let percentile = |i: usize| h.percentiles.map(|p| p[i]);
        map.serialize_entry("p50", &percentile(0))?;
        map.serialize_entry("p90", &percentile(1))?;
        map.serialize_entry("p99", &percentile(2))?;
        map.serialize_entry("max", &h.max)?;
        if self.age == 0 {
            map.serialize_entry("epoch", &(report.now.floor() as i64))?;
            map.serialize_entry("rate", &report.rate(h, self.windows.get(1)))?;
        }
        map.end()
    }
}

/// A label value as the exposition format wants it: backslash, double quote
/// and newline escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;
    use serde_json::Value;

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
                let windows = &report.single_windows();
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
            let mut map = serializer.serialize_map(Some(report.keys.len()))?;
            for (key, records) in &report.keys {
                map.serialize_entry(
                    key,
                    &KeyView {
                        report,
                        windows: &records.windows,
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
        let mut total = Total {
            count: latencies.len() as u64,
            sum: latencies.iter().sum(),
            ..Total::default()
        };
        for (edge, out) in PROMETHEUS_EDGES_MS.iter().zip(&mut total.at_or_below) {
            *out = latencies.iter().filter(|&&v| v <= *edge).count() as u64;
        }
        total
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
                let report = report_of(keys, key_info);
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

    #[test]
    fn prometheus_text_per_key_is_as_the_readme_says() {
        // (E + 5) lines labelled {dict="D",key="K"} (15 + |D| + |K| bytes
        // each, escaped), 185 + 45 E bytes of names and punctuation, the
        // `le` values and the numbers' digits (E + 3 counts, the sum, the
        // window, the rate).
        let edges = PROMETHEUS_EDGES_MS.len();
        let le: usize = PROMETHEUS_EDGES_MS
            .iter()
            .map(|e| format!("{}", e / 1000.0).len())
            .sum();
        assert_eq!(le, 35);
        let headers: usize = PROMETHEUS_SECTIONS.iter().map(|h| h.len()).sum();
        for (dict, key) in [("d", "k"), ("bench_stats_0_100000", "/path/12345")] {
            let mut report = Report::new(60, 90.0, 1).unwrap();
            report.add(key.as_bytes(), vec![histogram(&[12.0])], total(&[12.0]));
            let text = report.prometheus(dict).to_string();
            // Counts 1 (or 0 below 12 ms), sum 0.012, window 60, rate 1.
            let digits = (edges + 3) + "0.012".len() + "60".len() + "1".len();
            let per_key =
                (edges + 5) * (15 + dict.len() + key.len()) + 185 + 45 * edges + le + digits;
            assert_eq!(text.len() - headers, per_key, "{}", text);
        }
        // The docs' figures: 955 + 16 (|D| + |K|) bytes and the digits
        // with the 11 default edges.
        assert_eq!(16 * 15 + 185 + 45 * 11 + 35, 955);
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
