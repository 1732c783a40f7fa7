//! Renders request records read from the shared engine: the JSON of
//! greencheek's request counter (with percentiles added) through
//! `serde_json`, and the Prometheus text exposition format.
//!
//! The engine's walk ([`crate::ffi_engine`]) hands the records over key by
//! key; rendering, escaping and the arithmetic happen here.

use std::fmt::Write as _;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::engine::requests::Total;
use crate::error::Error;
use crate::histogram::{Summary, PROMETHEUS_EDGES_MS};

/// The most previous windows a report may show.
pub const MAX_PREVIOUS_WINDOWS: usize = 64;

/// The latest time a report accepts (epoch seconds, some 30 million years
/// from now): far past any clock, small enough for exact window arithmetic.
pub const MAX_NOW: f64 = 1e15;

#[derive(Debug)]
struct KeyRecords {
    key: String,
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
}

/// One report being put together.
#[derive(Debug)]
pub struct Report {
    window: u64,
    now: f64,
    previous: usize,
    keys: Vec<KeyRecords>,
    key_info: Option<KeyInfo>,
    /// "current", "prev1", "prev2", ...
    window_names: Vec<String>,
    rendered: String,
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
            keys: Vec::new(),
            key_info: None,
            window_names: (0..=previous)
                .map(|age| match age {
                    0 => "current".to_string(),
                    _ => format!("prev{}", age),
                })
                .collect(),
            rendered: String::new(),
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
        self.keys.push(KeyRecords {
            key: String::from_utf8_lossy(key).into_owned(),
            windows,
            total,
        });
    }

    /// How many windows before the current one the report shows.
    pub fn previous(&self) -> usize {
        self.previous
    }

    /// Orders the keys by their bytes, so that every worker renders the
    /// same text.
    pub fn sort_keys(&mut self) {
        self.keys.sort_by(|a, b| a.key.cmp(&b.key));
    }

    pub fn set_key_info(&mut self, info: KeyInfo) {
        self.key_info = Some(info);
    }

    /// The sliding-window estimate of requests per window:
    /// `previous * ((window - elapsed) / window) + current`.
    fn rate(&self, current: &Summary, previous: Option<&Summary>) -> f64 {
        let window = self.window as f64;
        let elapsed = self.now - self.window_start(0) as f64;
        let carried = previous.map_or(0.0, |p| p.count as f64 * ((window - elapsed) / window));
        carried + current.count as f64
    }

    /// The JSON of `stats` (every key) or, with `single`, of `single_stats`
    /// (the first key's windows directly under "stats", all zero when no
    /// key was added). Streamed by `serde_json`, with no tree built first.
    pub fn json(&mut self, free_space: f64, capacity: f64, single: bool) -> &str {
        let mut out = Vec::with_capacity(256 + self.keys.len() * 512);
        let view = ReportView {
            report: self,
            free_space,
            capacity,
            single,
        };
        // Writing to a Vec cannot fail, and every number is finite or null.
        let _ = serde_json::to_writer(&mut out, &view);
        // serde_json writes UTF-8 only.
        self.rendered = String::from_utf8(out).unwrap_or_default();
        &self.rendered
    }

    /// The Prometheus text exposition format: requests as a counter and
    /// latency as a histogram (both since the key was first recorded), the
    /// sliding-window rate as a gauge; every sample labelled with the dict
    /// and the key.
    pub fn prometheus(&mut self, dict: &str) -> &str {
        // Some 14 lines a key: build each from pieces made once.
        let mut out = String::with_capacity(512 + self.keys.len() * 1400);
        let dict = escape_label(dict);
        let labels: Vec<String> = self
            .keys
            .iter()
            .map(|r| format!("{{dict=\"{}\",key=\"{}\"", dict, escape_label(&r.key)))
            .collect();
        let edges: Vec<String> = PROMETHEUS_EDGES_MS
            .iter()
            .map(|le| format!(",le=\"{}\"}} ", le / 1000.0))
            .collect();

        out.push_str("# HELP resty_requests_total Requests recorded, by key.\n");
        out.push_str("# TYPE resty_requests_total counter\n");
        for (records, labels) in self.keys.iter().zip(&labels) {
            out.push_str("resty_requests_total");
            out.push_str(labels);
            let _ = writeln!(out, "}} {}", records.total.count);
        }

        out.push_str("# HELP resty_request_latency_seconds Request latency, by key.\n");
        out.push_str("# TYPE resty_request_latency_seconds histogram\n");
        for (records, labels) in self.keys.iter().zip(&labels) {
            let total = &records.total;
            for (below, edge) in total.at_or_below.iter().zip(&edges) {
                out.push_str("resty_request_latency_seconds_bucket");
                out.push_str(labels);
                out.push_str(edge);
                let _ = writeln!(out, "{}", below);
            }
            out.push_str("resty_request_latency_seconds_bucket");
            out.push_str(labels);
            let _ = writeln!(out, ",le=\"+Inf\"}} {}", total.count);
            out.push_str("resty_request_latency_seconds_sum");
            out.push_str(labels);
            let _ = writeln!(out, "}} {}", total.sum / 1000.0);
            out.push_str("resty_request_latency_seconds_count");
            out.push_str(labels);
            let _ = writeln!(out, "}} {}", total.count);
        }

        out.push_str(
            "# HELP resty_requests_window_rate Sliding-window estimate of requests per window, by key.\n",
        );
        out.push_str("# TYPE resty_requests_window_rate gauge\n");
        for (records, labels) in self.keys.iter().zip(&labels) {
            let rate = self.rate(&records.windows[0], records.windows.get(1));
            out.push_str("resty_requests_window_rate");
            out.push_str(labels);
            let _ = writeln!(out, ",window=\"{}\"}} {}", self.window, rate);
        }
        self.rendered = out;
        &self.rendered
    }
}

struct ReportView<'a> {
    report: &'a Report,
    free_space: f64,
    capacity: f64,
    single: bool,
}

struct DictInfo {
    free_space: f64,
    capacity: f64,
}

struct AllKeys<'a>(&'a Report);

struct KeyView<'a> {
    report: &'a Report,
    windows: &'a [Summary],
}

struct WindowView<'a> {
    report: &'a Report,
    windows: &'a [Summary],
    age: usize,
}

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
            let windows = report.keys.first().map_or(&empty[..], |k| &k.windows[..]);
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
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("tracked", &self.tracked)?;
        map.serialize_entry("max_keys", &self.max_keys)?;
        map.serialize_entry("overflow_key", &self.overflow_key)?;
        map.end()
    }
}

impl Serialize for AllKeys<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let report = self.0;
        let mut map = serializer.serialize_map(Some(report.keys.len()))?;
        for records in &report.keys {
            map.serialize_entry(
                &records.key,
                &KeyView {
                    report,
                    windows: &records.windows,
                },
            )?;
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
