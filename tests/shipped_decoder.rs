//! The shipped decoder for the default model reads: on behaviours held out from its training
//! its loss on the true answer is lower with the true activations than with another
//! behaviour's, and reading the paper's vegan control names the persona.

mod real;

use lqa::chat::Message;
use lqa::latentqa::decoder::Decoder;
use lqa::lit::data::{LabelSplit, LitData};
use lqa::lit::eval::{evaluate_reading, EvalOptions};
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
    // 24 held-out items of each kind, scored with true, mismatched and no activations
    let opts = EvalOptions {
        limit: Some(24),
        ..Default::default()
    };
    let r = evaluate_reading(&d, &data, &split, &opts).unwrap();
    let show = |k: &str| {
        let k = r.kind(k).unwrap();
        format!(
            "{}: true {:.3}, mismatched {:.3}, none {:.3}, true better {:.2}",
            k.kind, k.loss_true, k.loss_mismatched, k.loss_none, k.gap_mismatched.true_better.value
        )
    };
    // with the control in view (unmasked) the decoder reads it clearly
    let control = r.kind("control").unwrap();
    assert_eq!(control.n, 24);
    assert!(
        control.gap_mismatched.mean > 0.4 && control.gap_mismatched.true_better.value > 0.8,
        "{}",
        show("control")
    );
    // masked, its reading is weak but there (the issue this decoder is to be replaced for)
    for k in ["system", "stimulus"] {
        let g = &r.kind(k).unwrap().gap_mismatched;
        assert!(g.mean > 0.0 && g.true_better.value > 0.5, "{}", show(k));
    }
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
