//! Global helper functions: `env(name)`, `read_text(path)`, `write_text(path, text)`,
//! `read_json(path)`, `write_json(path, value)`, `to_json(array)`, `file_exists(path)`,
//! `timestamp()`, `clock()`.
//! (`ARGS` is set by the runtime.)

use std::path::Path;

use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};

use super::error::{ctx_err, ScriptResult, ToScript};
use super::{atomic_write, ScriptTensor};
use crate::Error;

pub fn register(engine: &mut Engine) {
    engine.register_fn("env", |name: &str| -> Dynamic {
        std::env::var(name).map_or(Dynamic::UNIT, Dynamic::from)
    });
    engine.register_fn("file_exists", |path: &str| Path::new(path).exists());
    engine.register_fn(
        "read_text",
        |ctx: NativeCallContext, path: &str| -> ScriptResult<String> {
            std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .at(&ctx)
        },
    );
    engine.register_fn(
        "write_text",
        |ctx: NativeCallContext, path: &str, text: &str| -> ScriptResult<()> {
            atomic_write(Path::new(path), |tmp| {
                std::fs::write(tmp, text).map_err(|e| Error::io(path, e))
            })
            .at(&ctx)
        },
    );
    engine.register_fn(
        "read_json",
        |ctx: NativeCallContext, path: &str| -> ScriptResult<Dynamic> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(path, e))
                .at(&ctx)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
                .at(&ctx)?;
            Ok(json_to_dynamic(value))
        },
    );
    engine.register_fn(
        "write_json",
        |ctx: NativeCallContext, path: &str, value: Dynamic| -> ScriptResult<()> {
            let json = dynamic_to_json(&value, "value")
                .map_err(|e| ctx_err(&ctx, format!("write_json {path}: {e}")))?;
            let mut text = serde_json::to_string_pretty(&json)
                .map_err(|e| ctx_err(&ctx, format!("write_json {path}: {e}")))?;
            text.push('\n');
            atomic_write(Path::new(path), |tmp| {
                std::fs::write(tmp, &text).map_err(|e| Error::io(path, e))
            })
            .at(&ctx)
        },
    );
    // Rhai has `to_json` for maps; this one takes arrays (e.g. a list of results).
    engine.register_fn(
        "to_json",
        |ctx: NativeCallContext, value: Array| -> ScriptResult<String> {
            let json = dynamic_to_json(&Dynamic::from_array(value), "value")
                .map_err(|e| ctx_err(&ctx, format!("to_json: {e}")))?;
            serde_json::to_string_pretty(&json).map_err(|e| ctx_err(&ctx, format!("to_json: {e}")))
        },
    );
    engine.register_fn("timestamp", timestamp);
    engine.register_fn("clock", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    });
}

/// The current UTC time as `2025-01-31T12:34:56Z`.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// JSON to a Rhai value: objects become maps, numbers ints when they are integers.
pub fn json_to_dynamic(value: serde_json::Value) -> Dynamic {
    use serde_json::Value as J;
    match value {
        J::Null => Dynamic::UNIT,
        J::Bool(b) => b.into(),
        J::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        J::String(s) => s.into(),
        J::Array(items) => items
            .into_iter()
            .map(json_to_dynamic)
            .collect::<Array>()
            .into(),
        J::Object(entries) => entries
            .into_iter()
            .map(|(k, v)| (k.into(), json_to_dynamic(v)))
            .collect::<Map>()
            .into(),
    }
}

/// A Rhai value to JSON; tensors become nested arrays; `at` names the place for errors.
pub fn dynamic_to_json(value: &Dynamic, at: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if value.is_unit() {
        return Ok(J::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(J::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(J::from(i));
    }
    if let Ok(f) = value.as_float() {
        // NaN and infinities have no JSON form: write null.
        return Ok(serde_json::Number::from_f64(f).map_or(J::Null, J::Number));
    }
    if let Ok(c) = value.as_char() {
        return Ok(J::String(c.to_string()));
    }
    if value.is_string() {
        return Ok(J::String(value.to_string()));
    }
    if value.is_array() {
        let items = value.read_lock::<Array>().expect("checked: array");
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| dynamic_to_json(v, &format!("{at}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(J::Array);
    }
    if value.is_map() {
        let map = value.read_lock::<Map>().expect("checked: map");
        let mut out = serde_json::Map::new();
        for (k, v) in map.iter() {
            out.insert(k.to_string(), dynamic_to_json(v, &format!("{at}.{k}"))?);
        }
        return Ok(J::Object(out));
    }
    if let Some(t) = value.read_lock::<ScriptTensor>() {
        let nested = t.to_nested().map_err(|e| format!("{at}: {e}"))?;
        return dynamic_to_json(&nested, at);
    }
    Err(format!(
        "{at}: cannot write a {} as JSON",
        value.type_name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
