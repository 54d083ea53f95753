//! Typed options: a map read into a struct with defaults; unknown keys and wrong types are errors
//! that name the key.

use lqa::script::options::parse;
use rhai::{Dynamic, Map};
use serde::Deserialize;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct Inner {
    r: usize,
    alpha: f64,
}

impl Default for Inner {
    fn default() -> Self {
        Inner { r: 8, alpha: 16.0 }
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct Opts {
    steps: usize,
    lr: f64,
    name: Option<String>,
    lora: Inner,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            steps: 10,
            lr: 1e-4,
            name: None,
            lora: Inner::default(),
        }
    }
}

fn map(code: &str) -> Map {
    rhai::Engine::new().eval::<Map>(code).unwrap()
}

#[test]
fn defaults_fill_what_is_not_given_nested_too() {
    let o: Opts = parse(&map("#{steps: 3, lora: #{r: 4}}"), "demo").unwrap();
    assert_eq!(
        o,
        Opts {
            steps: 3,
            lora: Inner { r: 4, alpha: 16.0 },
            ..Opts::default()
        }
    );
    let o: Opts = parse(&Map::new(), "demo").unwrap();
    assert_eq!(o, Opts::default());
}

#[test]
fn an_integer_is_taken_for_a_float() {
    let o: Opts = parse(&map("#{lr: 1}"), "demo").unwrap();
    assert_eq!(o.lr, 1.0);
}

#[test]
fn unknown_keys_are_named_with_the_known_ones() {
    let e = parse::<Opts>(&map("#{stpes: 3}"), "demo").unwrap_err();
    assert_eq!(
        e,
        "demo: unknown option `stpes` (known: steps, lr, name, lora)"
    );
    let e = parse::<Opts>(&map("#{lora: #{rank: 3}}"), "demo").unwrap_err();
    assert_eq!(e, "demo: unknown option `lora.rank` (known: r, alpha)");
}

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let e = parse::<Opts>(&map("#{steps: \"many\"}"), "demo").unwrap_err();
    assert!(
        e.starts_with("demo: option `steps`: string \"many\", expected usize"),
        "{e}"
    );
    let e = parse::<Opts>(&map("#{steps: 2.5}"), "demo").unwrap_err();
    assert!(
        e.starts_with("demo: option `steps`: float `2.5`, expected usize"),
        "{e}"
    );
    let e = parse::<Opts>(&map("#{steps: -1}"), "demo").unwrap_err();
    assert!(e.contains("option `steps`") && e.contains("-1"), "{e}");
    let e = parse::<Opts>(&map("#{lora: #{alpha: true}}"), "demo").unwrap_err();
    assert!(
        e.starts_with("demo: option `lora.alpha`: boolean `true`, expected f64"),
        "{e}"
    );
    let e = parse::<Opts>(&map("#{lora: 3}"), "demo").unwrap_err();
    assert!(e.starts_with("demo: option `lora`: integer `3`"), "{e}");
}

#[test]
fn values_with_no_plain_form_are_named() {
    let mut m = Map::new();
    m.insert(
        "name".into(),
        Dynamic::from(std::time::Duration::from_secs(1)),
    );
    let e = parse::<Opts>(&m, "demo").unwrap_err();
    assert!(
        e.contains("demo options: options.name: cannot write"),
        "{e}"
    );
}

#[derive(Debug, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
struct Extra {
    patch_all: bool,
}

#[test]
fn field_lists_come_from_the_struct() {
    assert_eq!(
        lqa::script::options::fields::<Opts>(),
        ["steps", "lr", "name", "lora"]
    );
    assert_eq!(lqa::script::options::fields::<Extra>(), ["patch_all"]);
}

#[test]
fn one_map_splits_into_two_option_structs() {
    use lqa::script::options::parse_split;
    let (o, e): (Opts, Extra) = parse_split(&map("#{steps: 2, patch_all: true}"), "ask").unwrap();
    assert_eq!((o.steps, e.patch_all), (2, true));
    let err = parse_split::<Opts, Extra>(&map("#{patch: true}"), "ask").unwrap_err();
    assert_eq!(
        err,
        "ask: unknown option `patch` (known: steps, lr, name, lora, patch_all)"
    );
    let err = parse_split::<Opts, Extra>(&map("#{patch_all: 1}"), "ask").unwrap_err();
    assert!(
        err.starts_with("ask: option `patch_all`: integer `1`, expected a boolean"),
        "{err}"
    );
}
