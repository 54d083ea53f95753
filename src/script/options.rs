//! Typed script options: every options map a binding takes is read into a struct with defaults,
//! once, at the call. An unknown key, or a value of the wrong type, is an error that names the key
//! (`lora.r`), what was expected, and the keys that exist.
//!
//! A binding declares its options as a serde struct with `#[serde(default, deny_unknown_fields)]`
//! (nested maps the same way) and calls [`options`]. Numbers follow the script's view: an integer
//! is accepted where a float is expected, not the other way round.

use super::error::{ctx_err, ScriptResult};
use super::globals::dynamic_to_json;
use rhai::{Dynamic, Map, NativeCallContext};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Read `map` into `T`; `what` names the options in errors (`"generate"`, `"trainer config"`).
pub fn parse<T: DeserializeOwned>(map: &Map, what: &str) -> Result<T, String> {
    let json = dynamic_to_json(&Dynamic::from_map(map.clone()), "options")
        .map_err(|e| format!("{what} options: {e}"))?;
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        describe(what, &path, &inner)
    })
}

/// [`parse`] at the position of the native call `ctx`.
pub fn options<T: DeserializeOwned>(
    ctx: &NativeCallContext,
    map: &Map,
    what: &str,
) -> ScriptResult<T> {
    parse(map, what).map_err(|e| ctx_err(ctx, e))
}

/// One line from serde's message: `unknown field `x`, expected one of `a`, `b`` becomes
/// "{what}: unknown option `x` (known: a, b)"; a type error names the key it happened at.
fn describe(what: &str, path: &str, inner: &str) -> String {
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let (key, tail) = rest.split_once('`').unwrap_or((rest, ""));
        // the path already ends at the unknown key
        let key = match path {
            "." | "" => key,
            full => full,
        };
        let known = tail
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .replace("` or `", ", ")
            .replace('`', "");
        let known = if known.starts_with("there are no fields") {
            "none".into()
        } else {
            known
        };
        return format!("{what}: unknown option `{key}` (known: {known})");
    }
    let inner = inner
        .replace("invalid type: ", "")
        .replace("floating point", "float")
        .replace("unit value", "()");
    match path {
        "." | "" => format!("{what} options: {inner}"),
        key => format!("{what}: option `{key}`: {inner}"),
    }
}

/// The option names a `#[derive(Deserialize)]` struct takes, read from serde's own description
/// of it (no list kept by hand).
pub fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let probe = FieldProbe(std::cell::Cell::new(&[]));
    let _ = T::deserialize(&probe);
    probe.0.get()
}

/// Read one map into two option structs: each key goes to the struct that has it (an `ask`
/// takes the generation options and its own). A key neither has is named with both lists.
pub fn parse_split<A: DeserializeOwned, B: DeserializeOwned>(
    map: &Map,
    what: &str,
) -> Result<(A, B), String> {
    let (fa, fb) = (fields::<A>(), fields::<B>());
    let (mut ma, mut mb) = (Map::new(), Map::new());
    for (k, v) in map {
        if fa.contains(&k.as_str()) {
            ma.insert(k.clone(), v.clone());
        } else if fb.contains(&k.as_str()) {
            mb.insert(k.clone(), v.clone());
        } else {
            let known: Vec<&str> = fa.iter().chain(fb).copied().collect();
            return Err(format!(
                "{what}: unknown option `{k}` (known: {})",
                known.join(", ")
            ));
        }
    }
    Ok((parse(&ma, what)?, parse(&mb, what)?))
}

/// A deserializer that only records the field list a struct asks for, then stops.
struct FieldProbe(std::cell::Cell<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for &FieldProbe {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(fields);
        Err(serde::de::Error::custom("fields read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Read `map` over the defaults `base` (a core config such as the trainer's, whose nested maps
/// — `lora` — take their defaults from `base` too): each key must be one of `base`'s (or of
/// `extra`, keys the caller took out first, named in the error only); nested maps merge key by
/// key with the same check.
pub fn parse_over<T: Serialize + DeserializeOwned>(
    map: &Map,
    base: &T,
    what: &str,
    extra: &[&str],
) -> Result<T, String> {
    use serde_json::Value;
    fn merge(
        base: &mut Value,
        user: Value,
        path: &str,
        what: &str,
        extra: &[&str],
    ) -> Result<(), String> {
        let (Value::Object(b), Value::Object(u)) = (&mut *base, &user) else {
            *base = user;
            return Ok(());
        };
        for (k, v) in u {
            let at = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match b.get_mut(k) {
                None => {
                    let known: Vec<&str> = b
                        .keys()
                        .map(String::as_str)
                        .chain(if path.is_empty() { extra } else { &[] }.iter().copied())
                        .collect();
                    return Err(format!(
                        "{what}: unknown option `{at}` (known: {})",
                        known.join(", ")
                    ));
                }
                Some(slot) if slot.is_object() && v.is_object() => {
                    merge(slot, v.clone(), &at, what, extra)?
                }
                Some(slot) => *slot = v.clone(),
            }
        }
        Ok(())
    }
    let user = dynamic_to_json(&Dynamic::from_map(map.clone()), "options")
        .map_err(|e| format!("{what} options: {e}"))?;
    let mut json = serde_json::to_value(base).map_err(|e| format!("{what}: {e}"))?;
    merge(&mut json, user, "", what, extra)?;
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        describe(what, &path, &e.into_inner().to_string())
    })
}
