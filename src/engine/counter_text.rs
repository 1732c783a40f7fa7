//! `resty.counter`'s keys in the Prometheus text format, read from the
//! engine: one pass over the counter records (kind `c`), sorted by key,
//! one line `family{labels} value` per key, byte for byte what the Lua
//! renderer of `resty.counter.metrics` writes for the same keys and values
//! (its `render_keys`, `key_labels`, `label_value` and `number_text`).
//!
//! A value is what `c:get(key)` reads for a counter with a sync interval:
//! [`Counter::value`], its cells read once each, as every worker sees them
//! then (an increment changes one cell: no value is torn). A key whose
//! dict value is no number (foreign) has no number to show and is left
//! out, as the Lua renderer leaves out what is not one. Nothing here takes
//! a lock.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::AtomicU64;

use super::counter::{self, Counter};
use super::table::Table;

/// How a key becomes labels (`key_labels` in `metrics.lua`).
#[derive(Debug, Clone, Copy)]
pub enum Labels<'a> {
    /// The default: `dict` (the dict's name) and `key` (the whole key).
    DictAndKey(&'a [u8]),
    /// A list of names: the key's parts between separators, one per name
    /// in order, the last name taking the rest of the key; a key with
    /// fewer parts leaves the last names without a value.
    Split {
        names: &'a [&'a [u8]],
        separator: &'a [u8],
    },
}

/// A renderer's room, kept between renders: the keys and the text.
#[derive(Debug, Default)]
pub struct Render {
    offsets: Vec<u32>,
    keys: Vec<(&'static [u8], f64)>,
    /// Each key's labels in `label_room`, and its value.
    spans: Vec<(usize, usize, f64)>,
    label_room: Vec<u8>,
    /// The text of the last render.
    pub text: Vec<u8>,
}

impl Render {
    /// Renders every counter key of `table` as samples of `family` into
    /// [`Render::text`] (replacing what it held); returns how many.
    pub fn counters(
        &mut self,
        table: &Table<'static, AtomicU64>,
        family: &[u8],
        labels: Labels<'_>,
    ) -> usize {
        let Render {
            offsets,
            keys,
            spans,
            label_room,
            text,
        } = self;
        keys.clear();
        // Records in the order they were made (address order, which the
        // hardware prefetches), then sorted by key as the Lua renderer
        // sorts its keys: bytes compared unsigned, a prefix first.
        for record in table.records_in_arena_order(offsets) {
            let key = record.key_bytes();
            if key.first() != Some(&counter::KIND) || record.width() != counter::WIDTH {
                continue;
            }
            let value = Counter::new(record.cells()).value();
            if !value.is_nan() {
                keys.push((&key[1..], value));
            }
        }
        keys.sort_unstable_by(|a, b| a.0.cmp(b.0));

        // Each key's labels, then its line. Keys may share labels (a list
        // of names leaves empty parts out; a key that is not UTF-8 shows a
        // byte as `\xNN`, which a key of those very characters shows
        // too): the Lua renderer writes such a series once, at its first
        // key, with the values summed in key order, and so does this.
        let split = matches!(labels, Labels::Split { .. });
        let mut may_share = split;
        let mut dict = Vec::new();
        if let Labels::DictAndKey(name) = labels {
            label_value(&mut dict, name);
        }
        label_room.clear();
        spans.clear();
        for &(key, value) in keys.iter() {
            let start = label_room.len();
            match labels {
                Labels::DictAndKey(_) => {
                    may_share = may_share || std::str::from_utf8(key).is_err();
                    let pairs: [(&[u8], &[u8], bool); 2] =
                        [(b"dict", &dict, false), (b"key", key, true)];
                    labels_text(label_room, &pairs);
                }
                Labels::Split { names, separator } => {
                    split_labels(label_room, key, names, separator);
                }
            }
            spans.push((start, label_room.len(), value));
        }
        let count = keys.len();
        // The keys point into the region: keep none past the call.
        keys.clear();
        if may_share {
            merge_shared(label_room, spans);
        }

        text.clear();
        text.reserve(label_room.len() + spans.len() * (family.len() + 24));
        for &(start, end, value) in spans.iter() {
            if start == usize::MAX {
                continue;
            }
            text.extend_from_slice(family);
            text.extend_from_slice(&label_room[start..end]);
            text.push(b' ');
            number_text(text, value);
            text.push(b'\n');
        }
        count
    }
}

/// Sums the values of spans of `labels` that hold the same text into the
/// first of them, and marks the others (start `usize::MAX`).
fn merge_shared(labels: &[u8], spans: &mut [(usize, usize, f64)]) {
    let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(spans.len());
    for i in 0..spans.len() {
        let (start, end, value) = spans[i];
        match first.entry(&labels[start..end]) {
            Entry::Occupied(at) => {
                spans[*at.get()].2 += value;
                spans[i].0 = usize::MAX;
            }
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
    }
}

/// `{a="x",b="y"}` from (name, value, whether to escape it) in order, a
/// pair with an empty value left out (Prometheus treats "" as absent);
/// nothing when all are.
fn labels_text(out: &mut Vec<u8>, pairs: &[(&[u8], &[u8], bool)]) {
    let mut first = true;
    for &(name, value, escape) in pairs {
        if value.is_empty() {
            continue;
        }
        out.push(if first { b'{' } else { b',' });
        first = false;
        out.extend_from_slice(name);
        out.extend_from_slice(b"=\"");
        if escape {
            label_value(out, value);
        } else {
            out.extend_from_slice(value);
        }
        out.push(b'"');
    }
    if !first {
        out.push(b'}');
    }
}

/// The labels of a key split at `separator` into `names` (at most 32
/// names: `metrics.lua` checks).
fn split_labels(out: &mut Vec<u8>, key: &[u8], names: &[&[u8]], separator: &[u8]) {
    let mut pairs: Vec<(&[u8], &[u8], bool)> = Vec::with_capacity(names.len());
    let mut rest = key;
    for (i, &name) in names.iter().enumerate() {
        let found = if i + 1 == names.len() {
            None
        } else {
            find(rest, separator)
        };
        match found {
            Some(at) => {
                pairs.push((name, &rest[..at], true));
                rest = &rest[at + separator.len()..];
            }
            None => {
                pairs.push((name, rest, true));
                break;
            }
        }
    }
    labels_text(out, &pairs);
}

/// Where `needle` first occurs in `haystack` (an empty one at 0), as Lua's
/// plain `string.find`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A label value as `metrics.lua`'s `label_value` writes it: a value that
/// is not UTF-8 shows its bytes from 0x80 on as `\xNN` (lowercase); then
/// backslashes (those of `\xNN` too), double quotes and newlines escaped.
pub fn label_value(out: &mut Vec<u8>, value: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let valid = std::str::from_utf8(value).is_ok();
    for &b in value {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x80..=0xff if !valid => {
                out.extend_from_slice(b"\\\\x");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
            b => out.push(b),
        }
    }
}

/// The largest magnitude below which `number_text` writes a whole number
/// as an integer: 2^53.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// A value as `metrics.lua`'s `number_text` writes it: a whole number
/// below 2^53 in magnitude as an integer, others as LuaJIT's
/// `string.format("%.15g")`, or `"%.17g"` when that does not read back the
/// same.
pub fn number_text(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if v == f64::INFINITY {
        out.extend_from_slice(b"+Inf");
    } else if v == f64::NEG_INFINITY {
        out.extend_from_slice(b"-Inf");
    } else if v.fract() == 0.0 && v > -EXACT && v < EXACT {
        out.extend_from_slice(itoa::Buffer::new().format(v as i64).as_bytes());
    } else {
        let start = out.len();
        lua_g(out, v, 15);
        let reads_back = std::str::from_utf8(&out[start..])
            .ok()
            .and_then(|text| text.parse::<f64>().ok())
            == Some(v);
        if !reads_back {
            out.truncate(start);
            lua_g(out, v, 17);
        }
    }
}

/// Digits past the precision that Rust writes to decide the rounding;
/// only a run of them that reads as an exact half needs the exact digits.
const GUARD_DIGITS: usize = 20;

/// Enough digits for any double's exact decimal expansion (at most 767
/// significant ones).
const EXACT_DIGITS: usize = 800;

/// `v` (finite) as LuaJIT's `string.format("%.<precision>g", v)` writes
/// it (`lj_strfmt_num.c`): as C's `%g` (fixed or with an exponent of two
/// digits at least, trailing zeros dropped), but a digit cut off at
/// exactly half rounds away from zero, where C's rounds to even
/// (`%.1g` of 0.25: LuaJIT "0.3", C "0.2").
fn lua_g(out: &mut Vec<u8>, v: f64, precision: usize) {
    if v.is_sign_negative() {
        out.push(b'-');
    }
    let v = v.abs();
    if v == 0.0 {
        out.push(b'0');
        return;
    }
    // The exact expansion rounded (by Rust, correctly) to `precision`
    // digits and the guard digits: the first digit past the precision
    // decides, unless the guard digits read 5000...: then the exact
    // expansion does (a 4999... rounded up, or a 5 exactly or with more).
    let (mut digits, mut exponent) = scientific(v, precision + GUARD_DIGITS);
    let cut = digits[precision];
    let up = if cut == b'5' && digits[precision + 1..].iter().all(|&d| d == b'0') {
        scientific(v, EXACT_DIGITS).0[precision] >= b'5'
    } else {
        cut >= b'5'
    };
    digits.truncate(precision);
    if up {
        let mut i = precision;
        loop {
            if i == 0 {
                // 9...9 rounded up: 10...0, one more in the exponent.
                digits.insert(0, b'1');
                digits.truncate(precision);
                exponent += 1;
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    while digits.len() > 1 && digits.last() == Some(&b'0') {
        digits.pop();
    }

    if exponent < -4 || exponent >= precision as i32 {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exponent < 0 { b'-' } else { b'+' });
        let magnitude = exponent.unsigned_abs();
        if magnitude < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(itoa::Buffer::new().format(magnitude).as_bytes());
    } else if exponent < 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat(b'0').take((-exponent - 1) as usize));
        out.extend_from_slice(&digits);
    } else {
        let whole = exponent as usize + 1;
        if digits.len() <= whole {
            out.extend_from_slice(&digits);
            out.extend(std::iter::repeat(b'0').take(whole - digits.len()));
        } else {
            out.extend_from_slice(&digits[..whole]);
            out.push(b'.');
            out.extend_from_slice(&digits[whole..]);
        }
    }
}

/// The first `count + 1` significant digits of `v` (positive, finite),
/// correctly rounded, and its decimal exponent.
fn scientific(v: f64, count: usize) -> (Vec<u8>, i32) {
    let text = format!("{:.*e}", count, v);
    let (mantissa, exponent) = text.split_at(text.find('e').unwrap_or(text.len()));
    let digits = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    (digits, exponent[1..].parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// A region with `keys` counted: (key, steps).
    fn table_with(keys: &[(&[u8], &[f64])]) -> Table<'static, AtomicU64> {
        let words: &'static [AtomicU64] = Box::leak(
            (0..1 << 16)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let table = Table::init(words, [1, 2], 0).unwrap();
        for &(key, steps) in keys {
            let mut name = vec![counter::KIND];
            name.extend_from_slice(key);
            let (record, _) = table.get_or_insert(&name, counter::WIDTH).unwrap();
            let counter = Counter::new(record.cells());
            counter.import_base(0.0);
            for &step in steps {
                if step.fract() == 0.0 {
                    counter.add(step as i64).unwrap();
                } else {
                    counter.add_fractional(step).unwrap();
                }
            }
        }
        table
    }

    fn text_of(table: &Table<'static, AtomicU64>, labels: Labels<'_>) -> (usize, String) {
        let mut render = Render::default();
        let count = render.counters(table, b"hits_total", labels);
        (count, String::from_utf8(render.text.clone()).unwrap())
    }

    fn split_text(table: &Table<'static, AtomicU64>, names: &[&[u8]], separator: &[u8]) -> String {
        text_of(table, Labels::Split { names, separator }).1
    }

    #[test]
    fn keys_are_sorted_escaped_and_their_values_exact() {
        let table = table_with(&[
            (b"b", &[2.0]),
            (b"q\"b\\s\nn", &[1.0]),
            (b"bin\xff\x80", &[3.0]),
            (b"caf\xc3\xa9", &[-4.0]),
            (b"a", &[9_007_199_254_740_991.0]),
            (b"half", &[0.5, -1.0]),
        ]);
        // A request record and a foreign key: left out.
        table.get_or_insert(b"rkey", 8).unwrap();
        let (foreign, _) = table.get_or_insert(b"cforeign", counter::WIDTH).unwrap();
        Counter::new(foreign.cells()).import_base(f64::NAN);

        let (count, text) = text_of(&table, Labels::DictAndKey(b"d\"ict"));
        assert_eq!(count, 6);
        assert_eq!(
            text,
            concat!(
                "hits_total{dict=\"d\\\"ict\",key=\"a\"} 9007199254740991\n",
                "hits_total{dict=\"d\\\"ict\",key=\"b\"} 2\n",
                "hits_total{dict=\"d\\\"ict\",key=\"bin\\\\xff\\\\x80\"} 3\n",
                "hits_total{dict=\"d\\\"ict\",key=\"caf\u{e9}\"} -4\n",
                "hits_total{dict=\"d\\\"ict\",key=\"half\"} -0.5\n",
                "hits_total{dict=\"d\\\"ict\",key=\"q\\\"b\\\\s\\nn\"} 1\n",
            )
        );
    }

    #[test]
    fn a_list_of_names_splits_keys_as_the_lua_code_does() {
        let table = table_with(&[
            (b"GET/200", &[5.0]),
            (b"POST/500/extra", &[2.0]),
            (b"PUT", &[1.0]),
            (b"/lead", &[1.0]),
            (b"x\xff/\xc3\xa9", &[1.0]),
        ]);
        assert_eq!(
            split_text(&table, &[b"method", b"status"], b"/"),
            concat!(
                "hits_total{status=\"lead\"} 1\n",
                "hits_total{method=\"GET\",status=\"200\"} 5\n",
                "hits_total{method=\"POST\",status=\"500/extra\"} 2\n",
                "hits_total{method=\"PUT\"} 1\n",
                // each part checked as UTF-8 on its own
                "hits_total{method=\"x\\\\xff\",status=\"\u{e9}\"} 1\n",
            )
        );
    }

    #[test]
    fn keys_that_share_labels_are_one_series_at_the_first_summed() {
        // "\xff" as text and the byte 0xff (not UTF-8) both show as \xff.
        let table = table_with(&[(b"\\xff", &[2.0]), (b"\xff", &[3.5]), (b"z", &[1.0])]);
        let (count, text) = text_of(&table, Labels::DictAndKey(b"d"));
        assert_eq!(count, 3);
        assert_eq!(
            text,
            "hits_total{dict=\"d\",key=\"\\\\xff\"} 5.5\nhits_total{dict=\"d\",key=\"z\"} 1\n"
        );

        let table = table_with(&[(b"a", &[1.0]), (b"a:", &[2.0]), (b"a:b", &[4.0])]);
        assert_eq!(
            split_text(&table, &[b"x", b"y"], b":"),
            "hits_total{x=\"a\"} 3\nhits_total{x=\"a\",y=\"b\"} 4\n"
        );
    }

    /// A small xorshift generator: the same cases every run.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Doubles of every kind number_text meets: any bits, short decimals,
    /// sums of halves and powers of two (exact ties when cut), near 2^53.
    fn numbers(n: usize) -> Vec<f64> {
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        let mut values = vec![
            0.25,
            -0.25,
            2.5,
            0.125,
            2f64.powi(-25),
            41_804_212_547_868.0 + 0.8125,
        ];
        while values.len() < n {
            let r = random.next();
            let v = match r % 5 {
                0 => f64::from_bits(random.next()),
                1 => (random.next() % 2_000_000) as f64 / 1000.0 - 1000.0,
                2 => (random.next() >> 11) as f64 * 2f64.powi(-(((r >> 8) % 80) as i32)),
                3 => 9_007_199_254_740_992.0 - (random.next() % 4096) as f64 / 8.0,
                _ => (random.next() % 1000) as f64 * 10f64.powi(((r >> 8) % 40) as i32 - 20),
            };
            if v.is_finite() {
                values.push(if r & 1 << 40 == 0 { v } else { -v });
            }
        }
        values
    }

    /// What LuaJIT (the `luajit` on PATH, the one the specs run) writes
    /// with `string.format` at these precisions, one line per value.
    fn luajit_formats(values: &[f64], precisions: &[usize]) -> Option<Vec<String>> {
        let script = format!(
            "for line in io.lines() do local v = tonumber(line) \
             local t = {{}} for _, p in ipairs({{{}}}) do \
             t[#t + 1] = string.format('%.' .. p .. 'g', v) end \
             print(table.concat(t, ' ')) end",
            precisions
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut child = Command::new("luajit")
            .arg("-e")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut input = String::new();
        for v in values {
            // Rust's shortest text that reads back as the same double.
            input.push_str(&format!("{:e}\n", v));
        }
        let mut stdin = child.stdin.take()?;
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output().ok()?;
        writer.join().ok()?.ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        Some(text.lines().map(str::to_string).collect())
    }

    #[test]
    fn numbers_are_written_as_luajit_writes_them() {
        let values = numbers(20_000);
        let precisions = [1, 2, 3, 15, 17];
        let expected = match luajit_formats(&values, &precisions) {
            Some(lines) => lines,
            // A machine without luajit: the specs compare in nginx.
            None => return eprintln!("no luajit on PATH: skipped"),
        };
        assert_eq!(expected.len(), values.len());
        for (v, line) in values.iter().zip(expected) {
            let ours: Vec<String> = precisions
                .iter()
                .map(|&p| {
                    let mut out = Vec::new();
                    lua_g(&mut out, *v, p);
                    String::from_utf8(out).unwrap()
                })
                .collect();
            assert_eq!(ours.join(" "), line, "value {:e}", v);
        }
    }

    #[test]
    fn number_text_is_the_integer_or_the_fewest_digits_that_read_back() {
        let cases: [(f64, &str); 10] = [
            (0.0, "0"),
            (-0.0, "0"),
            (-9_007_199_254_740_991.0, "-9007199254740991"),
            (9_007_199_254_740_992.0, "9007199254740992"),
            (0.1 + 0.2, "0.30000000000000004"),
            (2f64.powi(-25), "2.9802322387695313e-08"),
            (1e15 + 0.5, "1000000000000000.5"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for (v, text) in cases {
            let mut out = Vec::new();
            number_text(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), text, "{:e}", v);
        }
        for v in numbers(20_000) {
            let mut out = Vec::new();
            number_text(&mut out, v);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.parse::<f64>().unwrap(), v, "{}", text);
        }
    }

    /// Reads a label value back: the key's bytes, with what was not UTF-8
    /// as `\xNN`.
    fn unescape(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            if text[i] == b'\\' {
                out.push(match text[i + 1] {
                    b'n' => b'\n',
                    other => other,
                });
                i += 2;
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn label_values_are_utf8_and_read_back_as_the_key() {
        let mut random = Random(12345);
        let bytes = [
            b'a', b'\\', b'"', b'\n', 0, 0x80, 0xff, 0xc3, 0xa9, b'x', b'}',
        ];
        for _ in 0..20_000 {
            let len = (random.next() % 12) as usize;
            let key: Vec<u8> = (0..len)
                .map(|_| bytes[(random.next() % bytes.len() as u64) as usize])
                .collect();
            let mut out = Vec::new();
            label_value(&mut out, &key);
            let text = std::str::from_utf8(&out).expect("UTF-8");
            assert!(!text.contains('\n'));
            // every quote escaped: none after an even run of backslashes
            let mut backslashes = 0;
            for b in text.bytes() {
                if b == b'"' {
                    assert_eq!(backslashes % 2, 1, "{:?}", text);
                }
                backslashes = if b == b'\\' { backslashes + 1 } else { 0 };
            }
            let back = unescape(&out);
            let expected: Vec<u8> = if std::str::from_utf8(&key).is_ok() {
                key.clone()
            } else {
                key.iter()
                    .flat_map(|&b| {
                        if b >= 0x80 {
                            format!("\\x{:02x}", b).into_bytes()
                        } else {
                            vec![b]
                        }
                    })
                    .collect()
            };
            assert_eq!(back, expected, "{:?}", key);
        }
    }
}

/// `cargo test --release --no-default-features counter_text_timing --
/// --ignored --nocapture`: a render of 10,000 and 100,000 keys in plain
/// memory, best of 5.
#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn counter_text_timing() {
        for &keys in &[10_000usize, 100_000] {
            let words: &'static [AtomicU64] = Box::leak(
                (0..keys * 24)
                    .map(|_| AtomicU64::new(0))
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
            let table = Table::init(words, [1, 2], 0).unwrap();
            for i in 0..keys {
                let key = format!("c/path/{}", i);
                let (record, _) = table.get_or_insert(key.as_bytes(), counter::WIDTH).unwrap();
                Counter::new(record.cells()).add(i as i64).unwrap();
            }
            let mut render = Render::default();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = Instant::now();
                assert_eq!(
                    render.counters(&table, b"resty_counts_total", Labels::DictAndKey(b"d")),
                    keys
                );
                best = best.min(start.elapsed().as_secs_f64());
            }
            println!(
                "{} keys: {:.2} ms, {} bytes",
                keys,
                best * 1e3,
                render.text.len()
            );
        }
    }
}
