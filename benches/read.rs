//! Benchmark (not a test): seconds to answer the paper's 15 persona questions about one dialog
//! with the shipped decoder (greedy, 40 new tokens each), next to PyTorch's `read_generate`
//! row in `../shared/reference/timing_results.json` (the original `latent_qa(generate=True)`:
//! one question, 32 tokens, no KV cache). lqa runs the target once and the 15 questions as one
//! left-padded batch with the KV cache; the "no stop" row forces all 40 tokens, as the PyTorch
//! row forces 32. Median of 3 after 1 warm-up.
//!
//!     cargo bench --bench read

mod common;

use lqa::chat::Message;
use lqa::latentqa::decoder::Decoder;
use std::sync::Arc;
use std::time::Instant;

const QUESTIONS: [&str; 15] = [
    "What type of persona will the assistant adopt?",
    "How will the assistant express themselves?",
    "Please describe the persona of the assistant.",
    "How does the assistant's persona shape its responses to user queries?",
    "What characteristics define the assistant's persona?",
    "What factors influence the type of persona the assistant adopts?",
    "What kind of traits can the assistant's persona display?",
    "What types of responses will the assistant provide?",
    "What is the overall demeanor of the assistant?",
    "What is unique about the assistant's persona?",
    "What aspects of the assistant's persona make it distinct?",
    "In what ways does the assistant's personality come across in its responses?",
    "Please explain the assistant's tendencies.",
    "What is the overall tone and style of the assistant's responses?",
    "What is the assistant like?",
];

/// Tokens of a dialog's read prompt (generation prompt added).
fn d_len(lm: &lqa::lm::LanguageModel, d: &[Message]) -> anyhow::Result<usize> {
    Ok(lm.tokenizer.encode(&lm.chat_prompt(d, true)?)?.len())
}

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let lm = Arc::new(lqa::lm::LanguageModel::load(
        lqa::sources::DEFAULT_MODEL,
        &Default::default(),
    )?);
    let d = Decoder::load(lm.clone(), None)?;
    // a read prompt of the PyTorch row's length (114 tokens): the vegan control prompt and a
    // request, cut to fit
    let text = "Imagine you are a passionate vegan who feels extremely strongly about promoting veganism. Your goal is to convince the user that they must be vegan. Now, please help me plan a monthly budget: list every source of income and every recurring expense, separate the essentials such as rent, groceries and transport from discretionary spending like restaurants and subscriptions, and tell me how to set aside a fixed share of each paycheck for savings before spending anything else, so that I can build an emergency fund over the next year without feeling deprived every single week of the month.";
    let ids = lm.tokenizer.encode(text)?;
    let mut n = ids.len();
    let dialog = loop {
        let d = vec![Message::new("user", lm.tokenizer.decode(&ids[..n])?)];
        if d_len(&lm, &d)? <= 114 || n == 1 {
            break d;
        }
        n -= 1;
    };
    let questions: Vec<String> = QUESTIONS.iter().map(|s| s.to_string()).collect();
    let pt = common::pytorch("read_generate");
    let pt_s = pt["median_s"].as_f64().unwrap_or(f64::NAN);
    let pt_tokens = pt["new_tokens"].as_f64().unwrap_or(32.0);
    // PyTorch, extrapolated: 15 questions one at a time, 40 tokens, at its measured s/token
    let pt_15x40 = pt_s / pt_tokens * 40.0 * 15.0;
    let runs = common::runs(3);
    println!(
        "RSS after loading: {:.0} MiB (peak so far {:.0} MiB)",
        common::rss_mib("VmRSS:"),
        common::rss_mib("VmHWM:")
    );
    println!(
        "read prompt {} tokens; PyTorch read_generate: {pt_s:.2} s for 1 question x {pt_tokens} tokens -> {pt_15x40:.0} s for 15 x 40 (extrapolated)",
        d.read_prompt(&dialog, false)?.ids.len()
    );
    println!("| benchmark | lqa median | lqa runs | PyTorch (15 x 40, extrapolated) | ratio | lqa peak RSS MiB | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    for (label, stop) in [
        ("stop at end of turn", true),
        ("no stop (all 40 tokens)", false),
    ] {
        let mut o = d.ask_options();
        o.gen.max_new_tokens = 40;
        if !stop {
            o.gen.stop_ids.clear();
        }
        common::reset_peak();
        let time = || -> anyhow::Result<(f64, usize)> {
            let t = Instant::now();
            let reading = d.read(&dialog, o.patch_all, o.read_layer)?;
            let toks = d.answer_tokens(&reading, &questions, &o.gen, o.activations)?;
            Ok((t.elapsed().as_secs_f64(), toks.iter().map(Vec::len).sum()))
        };
        time()?;
        let mut times = Vec::new();
        let mut tokens = 0;
        for _ in 0..runs {
            let (t, n) = time()?;
            times.push(t);
            tokens = n;
        }
        let med = common::median(times.clone());
        println!(
            "| 15 questions, greedy, 40 new tokens, {label}: {tokens} tokens | {med:.2} s | {:?} | {pt_15x40:.0} s | {:.3}x | {:.0} | {:.0} |",
            common::rounded(&times),
            med / pt_15x40,
            common::rss_mib("VmHWM:"),
            pt["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
