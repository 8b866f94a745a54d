//! The access line, written straight into a byte buffer.
//!
//! It is the line tracing-subscriber's JSON formatter made of the `tfmirror::access` event,
//! byte for byte (`tests::direct_lines_match_the_tracing_formatter` holds the two side by
//! side): the same keys in the same order, the same string escaping (serde_json's, which that
//! formatter uses too), the same number forms and timestamp. Going through tracing cost a
//! `String` for the timestamp, a generic field visitor and a UTF-8 check per write: about 9% of
//! the CPU of a cached hit.

use std::fmt::Display;

use serde::Serializer as _;

use crate::identity::ShortName;

/// The target of the access event; the `target` key of the line.
pub(super) const TARGET: &str = "tfmirror::access";

/// What one access line says, in the order its keys are written. `None` fields are left out,
/// as tracing leaves out an empty `Option`.
pub(super) struct Fields<'a> {
    pub method: &'a str,
    pub route: &'static str,
    pub module: Option<Text<'a>>,
    pub version: Option<&'a dyn Display>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub cache: Option<&'static str>,
    pub identity: Option<ShortName>,
    pub bytes: usize,
    pub duration_ms: f64,
    pub error: Option<&'a str>,
}

/// A field's value: text as it is, or a value that displays itself (a provider's address, a
/// version), escaped as it is written.
#[derive(Clone, Copy)]
pub(super) enum Text<'a> {
    Str(&'a str),
    Display(&'a dyn Display),
}

impl Display for Text<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Text::Str(s) => f.write_str(s),
            Text::Display(d) => d.fmt(f),
        }
    }
}

/// Append the line (with its newline) for an event at `micros` (unix microseconds).
pub(super) fn write(out: &mut Vec<u8>, micros: u64, f: &Fields<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, micros);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"method\":");
    string(out, f.method);
    out.extend_from_slice(b",\"route\":");
    string(out, f.route);
    match f.module {
        Some(Text::Str(m)) => {
            out.extend_from_slice(b",\"module\":");
            string(out, m);
        }
        Some(Text::Display(m)) => {
            out.extend_from_slice(b",\"module\":");
            display(out, m);
        }
        None => {}
    }
    if let Some(v) = f.version {
        out.extend_from_slice(b",\"version\":");
        display(out, v);
    }
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(f.status));
    if let Some(s) = f.upstream_status {
        out.extend_from_slice(b",\"upstream_status\":");
        number(out, u64::from(s));
    }
    if let Some(c) = f.cache {
        out.extend_from_slice(b",\"cache\":");
        string(out, c);
    }
    if let Some(id) = &f.identity {
        out.extend_from_slice(b",\"identity\":");
        string(out, id.as_str());
    }
    out.extend_from_slice(b",\"bytes\":");
    number(out, f.bytes as u64);
    out.extend_from_slice(b",\"duration_ms\":");
    json(out, &f.duration_ms);
    if let Some(e) = f.error {
        out.extend_from_slice(b",\"error\":");
        string(out, e);
    }
    out.extend_from_slice(b"},\"target\":");
    string(out, TARGET);
    out.extend_from_slice(b"}\n");
}

/// Any serializable value as serde_json writes it (escaping, number forms, `null` for a
/// non-finite float). Writing into a `Vec` cannot fail.
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `s` as a JSON string. Most values here (methods, route templates, module paths, cache
/// statuses, hex) have nothing to escape: those are copied as they are, without serde_json's
/// per-call set-up; anything else is escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        json(out, s);
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    json(out, &n);
}

/// A displayed value as a JSON string, escaped as it is written (no intermediate `String`).
fn display(out: &mut Vec<u8>, v: &dyn Display) {
    let _ = (&mut serde_json::Serializer::new(&mut *out)).collect_str(v);
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's default timer writes it:
/// `2026-11-27T10:04:05.123456Z`.
pub(super) fn timestamp(out: &mut Vec<u8>, micros: u64) {
    let secs = micros / 1_000_000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    if year > 9999 {
        out.push(b'+');
        number(out, year);
    } else {
        digits(out, year, 4);
    }
    out.push(b'-');
    digits(out, month, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, of_day / 3600, 2);
    out.push(b':');
    digits(out, of_day / 60 % 60, 2);
    out.push(b':');
    digits(out, of_day % 60, 2);
    out.push(b'.');
    digits(out, micros % 1_000_000, 6);
    out.push(b'Z');
}

/// `n`'s last `width` decimal digits, zero-padded.
fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for d in out[start..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// (year, month, day) of a count of days since 1970-01-01, in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(micros: u64) -> String {
        let mut out = Vec::new();
        timestamp(&mut out, micros);
        String::from_utf8(out).unwrap()
    }

    /// Strings copied as they are and strings escaped by serde_json come out as serde_json
    /// writes them.
    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let cases = [
            "",
            "GET",
            "infra/vpc/aws",
            "module_versions",
            "a\"b",
            "a\\b",
            "tab\there",
            "\u{7f}",
            "\u{1f}",
            " ~",
            "é",
            "\u{2028}",
        ];
        for s in cases {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let table = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400_000_001, "2000-02-29T00:00:00.000001Z"),
            (951_868_800_000_000, "2000-03-01T00:00:00.000000Z"),
            (1_709_164_799_999_999, "2024-02-28T23:59:59.999999Z"),
            (1_709_251_199_123_456, "2024-02-29T23:59:59.123456Z"),
            (1_798_761_599_500_000, "2026-12-31T23:59:59.500000Z"),
            (4_107_542_400_000_000, "2100-03-01T00:00:00.000000Z"),
            (4_107_456_000_000_000, "2100-02-28T00:00:00.000000Z"),
            (253_402_300_799_999_999, "9999-12-31T23:59:59.999999Z"),
            (253_402_300_800_000_000, "+10000-01-01T00:00:00.000000Z"),
        ];
        for (micros, want) in table {
            assert_eq!(ts(micros), want, "{micros}");
        }
    }

    /// tracing-subscriber's own timer, read between two reads of tfmirror's clock, lands
    /// between the two timestamps written here (same width, so text order is time order).
    #[test]
    fn timestamps_match_tracing_subscribers_timer() {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        let before = ts(crate::clock::now_micros());
        let mut theirs = String::new();
        SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let after = ts(crate::clock::now_micros());
        assert_eq!(theirs.len(), before.len(), "{theirs} vs {before}");
        assert!(
            before <= theirs && theirs <= after,
            "{before} {theirs} {after}"
        );
    }
}
