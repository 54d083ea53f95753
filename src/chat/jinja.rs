//! The Jinja runtime chat templates are rendered in: minijinja set up as `transformers`'
//! `apply_chat_template` sets up Jinja2.
//!
//! `trim_blocks` and `lstrip_blocks`, no auto-escaping, Python string/dict/list methods
//! (`.strip()`, `.startswith()`, `.items()`... from `minijinja-contrib`'s pycompat),
//! `raise_exception(msg)`, `strftime_now(fmt)` (UTC), and a `tojson` filter that writes JSON as
//! Python's `json.dumps` does. `{% generation %}` blocks are rendered as plain blocks.
//! Undefined values are lenient as in Jinja2: they print as nothing and are falsy.
//! Not supported: `{% break %}`/`{% continue %}` (minijinja's `loop_controls` feature is off).

use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::Serialize;

/// An environment holding one template, `source` compiled under `name`, with the shims above.
pub(crate) fn environment(
    name: &str,
    source: &str,
) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(name.to_string(), rewrite_generation_tags(source))?;
    Ok(env)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01 (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `strftime` for the usual codes, on a UTC time given in seconds since the epoch.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let wd = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(mo - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&mo.to_string()),
                Some('H') => out.push_str(&h.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&fmt, secs)
}

/// JSON with Python's default separators `", "` and `": "` (`json.dumps` without indent).
struct PyCompactFormatter;

impl serde_json::ser::Formatter for PyCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
/// The keyword arguments `indent` and `ensure_ascii` are supported, `separators` and
/// `sort_keys` are not.
fn tojson(
    value: Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let res = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyCompactFormatter);
            value.serialize(&mut ser)
        }
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut s = String::from_utf8(buf)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if ensure_ascii {
        // Non-ASCII can only occur inside JSON strings: escape it as Python does.
        let mut escaped = String::with_capacity(s.len());
        for c in s.chars() {
            if c.is_ascii() {
                escaped.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    escaped.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        s = escaped;
    }
    Ok(Value::from_safe_string(s))
}

/// Rewrite `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker
/// extension) to `{% if true %}` / `{% endif %}`, keeping whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let lead = inner.len() - inner.trim_start_matches(['-', '+']).len();
        let trail = inner.len() - inner.trim_end_matches(['-', '+']).len();
        let word = inner[lead..inner.len() - trail].trim();
        out.push_str(&rest[..start]);
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..lead]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(&inner[inner.len() - trail..]);
                out.push_str("%}");
            }
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 00:00:00 UTC
        assert_eq!(strftime_utc("%d %b %Y", 1_721_952_000), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %j", 951_827_696),
            "2000-02-29 12:34:56 Tuesday 060"
        );
        assert_eq!(strftime_utc("%B %-d, %y %%", 0), "January 1, 70 %");
    }

    #[test]
    fn generation_tags_rewritten() {
        assert_eq!(
            rewrite_generation_tags(
                "a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}"
            ),
            "a{%- if true %}b{% endif -%}c{% if x %}{% endif %}"
        );
    }
}
