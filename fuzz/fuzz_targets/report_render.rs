//! Reports from arbitrary keys, records and clock values: rendering never
//! panics, the JSON always parses and carries every key, each Prometheus
//! sample line is well formed, and rendering in steps of a few keys gives
//! the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resty_counter_core::engine::requests::Total;
use resty_counter_core::histogram::{Histogram, Summary};
use resty_counter_core::stats::Report;

/// The report the bytes describe, and its keys.
fn build(data: &[u8]) -> Option<(Report, Vec<String>)> {
    let window = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let mut now_raw = [0u8; 8];
    now_raw.copy_from_slice(&data[2..10]);
    let now = f64::from_le_bytes(now_raw);
    let previous = usize::from(data[10] % 70);
    let mut report = match Report::new(window, now, previous) {
        Ok(report) => report,
        Err(_) => return None,
    };
    // The rest: keys of the form [key len][key][windows][latencies len]
    // [latencies, one byte each], and a total from the same bytes.
    let mut rest = &data[11..];
    let mut keys = Vec::new();
    while rest.len() >= 3 {
        let key_len = usize::from(rest[0]).min(rest.len() - 1);
        let key = &rest[1..1 + key_len];
        rest = &rest[1 + key_len..];
        keys.push(String::from_utf8_lossy(key).into_owned());
        if rest.len() < 2 {
            report.add(key, Vec::new(), Total::default());
            break;
        }
        let windows = usize::from(rest[0] % 70);
        let latencies_len = usize::from(rest[1]).min(rest.len() - 2);
        let latencies = &rest[2..2 + latencies_len];
        let mut h = Histogram::new();
        for &ms in latencies {
            h.record(f64::from(ms) * 37.5);
        }
        let total = Total {
            count: h.count,
            sum: h.sum,
            ..Total::default()
        };
        report.add(key, vec![Summary::of(&h); windows], total);
        rest = &rest[2 + latencies_len..];
    }
    Some((report, keys))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (mut report, keys) = match build(data) {
        Some(built) => built,
        None => return,
    };
    // Rendering in steps frees the keys as it goes: the steps run on a
    // report of their own.
    let mut stepped = build(data).expect("built once");
    let whole = report.json(1.0, 2.0, false).to_string();
    let step = usize::from(data[11] % 4) + 1;
    let mut in_steps = Vec::new();
    stepped.0.begin_json(1.0, 2.0, false);
    while !stepped.0.render(step) {
        in_steps.extend_from_slice(stepped.0.text());
        stepped.0.clear_text();
    }
    in_steps.extend_from_slice(stepped.0.text());
    assert_eq!(in_steps, whole.as_bytes(), "JSON in steps of {}", step);
    let json: serde_json::Value = serde_json::from_str(&whole).expect("valid JSON");
    for key in &keys {
        assert!(json["stats"].get(key).is_some(), "key {:?} missing", key);
    }
    let _: serde_json::Value =
        serde_json::from_str(report.json(1.0, 2.0, true)).expect("valid JSON");

    let text = report.prometheus("dict\"\n\\").to_string();
    let mut stepped = build(data).expect("built once");
    let mut in_steps = Vec::new();
    stepped.0.begin_prometheus("dict\"\n\\");
    while !stepped.0.render(step) {
        in_steps.extend_from_slice(stepped.0.text());
        stepped.0.clear_text();
    }
    in_steps.extend_from_slice(stepped.0.text());
    assert_eq!(in_steps, text.as_bytes(), "Prometheus in steps of {}", step);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        // name{labels} value: no raw newline can hide in a label.
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        assert!(series.ends_with('}'), "{}", line);
        assert!(value.parse::<f64>().is_ok() || value == "NaN", "{}", line);
    }
});
