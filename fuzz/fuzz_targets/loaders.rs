//! libFuzzer over one lqa loader, chosen by `LQA_FUZZ_TARGET` (a name of `lqa::fuzz::TARGETS`:
//! gguf, safetensors, config_json, tokenizer_json, ...). The fixture files the loader needs
//! besides the fuzzed one come from `LQA_FUZZ_FIXTURES` (written by
//! `LQA_FUZZ_FIXTURES=DIR cargo test --test fuzz_loaders`). See `fuzz/README.md`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

struct Setup {
    fixtures: PathBuf,
    scratch: PathBuf,
    target: &'static lqa::fuzz::Target,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let name = std::env::var("LQA_FUZZ_TARGET").expect("set LQA_FUZZ_TARGET to a loader name");
        let target = lqa::fuzz::target(&name)
            .unwrap_or_else(|| panic!("unknown LQA_FUZZ_TARGET `{name}`"));
        let fixtures = PathBuf::from(
            std::env::var_os("LQA_FUZZ_FIXTURES").expect("set LQA_FUZZ_FIXTURES to the fixtures folder"),
        );
        let scratch = std::env::temp_dir().join(format!("lqa-fuzz-{name}-{}", std::process::id()));
        Setup {
            fixtures,
            scratch,
            target,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let s = setup();
    // an error is a fine outcome; a panic, a hang or a huge allocation is what libFuzzer reports
    let _ = lqa::fuzz::run_case(&s.fixtures, &s.scratch, s.target, data);
});
