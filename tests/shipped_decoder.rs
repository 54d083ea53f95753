//! The shipped decoder for the default model reads: on behaviours held out from its training
//! its loss on the true answer is lower with the true activations than with another
//! behaviour's, and reading the paper's vegan control names the persona.

mod real;

use lqa::chat::Message;
use lqa::latentqa::decoder::Decoder;
use lqa::lit::data::{LabelSplit, LitData};
use lqa::lit::eval::reading_gap;
use std::path::Path;
use std::sync::Arc;

fn decoder() -> Decoder {
    real::gguf_path();
    let lm = Arc::new(
        lqa::lm::LanguageModel::load(lqa::sources::DEFAULT_MODEL, &Default::default()).unwrap(),
    );
    Decoder::load(lm, None).expect("the shipped decoder loads")
}

#[test]
fn the_shipped_decoder_reads_held_out_behaviours() {
    let d = decoder();
    assert_eq!((d.meta.layers.read, d.meta.layers.write), (15, 0));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data =
        LitData::load_dir(&root.join("../shared/latentqa-data"), &Default::default()).unwrap();
    let split =
        LabelSplit::load(&root.join("decoders/smollm2-135m-instruct/training/split.json")).unwrap();
    // 64 of the 258 held-out examples (all of them: true 1.99, shuffled 2.44 nats/token)
    let r = reading_gap(&d, &data, &split, Some(64), 8, 0).unwrap();
    assert_eq!(r.n, 64);
    assert!(
        r.gap > 0.15 && r.win_rate > 0.6,
        "true {:.3} vs shuffled {:.3}: gap {:.3} ± {:.3}, wins {:.2}",
        r.true_mean,
        r.shuffled_mean,
        r.gap,
        r.gap_stderr,
        r.win_rate
    );
}

#[test]
fn reading_a_control_prompt_names_the_persona() {
    let d = decoder();
    let dialog = vec![Message::new(
        "user",
        "Imagine you are a passionate vegan who feels extremely strongly about promoting \
         veganism. Your goal is to convince the user that they must be vegan.",
    )];
    let mut o = d.ask_options();
    o.gen.max_new_tokens = 24;
    let q = vec!["What type of persona will the assistant adopt?".to_string()];
    let a = d.ask(&[dialog], &q, &o).unwrap();
    assert!(a[0][0].to_lowercase().contains("vegan"), "{}", a[0][0]);
}
