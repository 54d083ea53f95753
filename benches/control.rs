//! Benchmark (not a test): seconds per control step at batch 1 and 4, and peak RSS, next to
//! PyTorch's `control_step_b1` / `control_step_b4` in `../shared/reference/timing_results.json`.
//! As timing.py: read prompts `[user instruction, assistant reply]` of about 119 tokens, decoder
//! prompts of about 170 tokens, labels on the final answer only; the target carries the paper's
//! control LoRA (r 16, alpha 32, dropout 0.1, the 7 projections on layers 0-15 plus lm_head:
//! 3,400,704 parameters), Adam lr 1e-4; a step is the patched loss, the backward through the
//! frozen decoder into the target, and the update. Median of 5 after 1 warm-up.
//!
//!     cargo bench --bench control

mod common;

use lqa::chat::Message;
use lqa::control::data::{Control, ControlSample};
use lqa::control::{ControlConfig, ControlOptimizer};
use lqa::latentqa::decoder::Decoder;
use lqa::latentqa::{ReadDialog, VerbMask};
use std::sync::Arc;

const INSTRUCTIONS: [&str; 4] = [
    "Explain how a lighthouse keeper in the nineteenth century spent a typical stormy night, what tools and routines kept the lantern burning until dawn, and why the work mattered so much to the fishing boats returning home along the rocky coast.",
    "Describe how photosynthesis turns light into chemical energy, which parts of the chloroplast take part, what happens to the water molecules that are split, and how the Calvin cycle finally fixes carbon dioxide from the air into sugars.",
    "Give me practical advice on planning a monthly budget: how to list income and recurring expenses, how to separate essentials from discretionary spending, and how to build an emergency fund without feeling deprived every single week.",
    "Summarize the history of timekeeping from Egyptian shadow clocks and Greek water clocks to the pendulum clocks of the seventeenth century, and explain why accurate marine chronometers transformed navigation and global trade.",
];
const REPLIES: [&str; 4] = [
    "He climbed the stairs at dusk, trimmed the wick, polished the lens and wound the clockwork that turned the light. On stormy nights he stayed awake until dawn, because a dark lantern could cost the boats their way home.",
    "Chlorophyll in the thylakoids absorbs red and blue light, which splits water and releases oxygen. The energy is stored as ATP and NADPH, which the Calvin cycle in the stroma uses to turn carbon dioxide into sugar.",
    "List every source of income and each recurring bill, then mark rent, food and transport as essentials. Move a fixed share of each paycheck into savings first, and give yourself a small, guilt-free allowance for fun.",
    "Shadow clocks and water clocks measured hours roughly; pendulum clocks made timekeeping precise. Marine chronometers kept accurate time at sea, which let sailors compute their longitude and made long voyages far safer.",
];

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let lm = Arc::new(lqa::lm::LanguageModel::load(
        lqa::sources::DEFAULT_MODEL,
        &Default::default(),
    )?);
    let decoder = Decoder::load(lm.clone(), None)?;
    let control = Control::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/latentqa-data/controls/promote_veganism.json"),
    )?;
    let runs = common::runs(5);
    println!("| benchmark | lqa median | lqa runs | PyTorch median | ratio | lqa peak RSS MiB | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    for (batch, bench) in [(1usize, "control_step_b1"), (4, "control_step_b4")] {
        let samples: Vec<ControlSample> = (0..batch * (runs + 1))
            .map(|i| ControlSample {
                read: ReadDialog {
                    messages: vec![
                        Message::new("user", INSTRUCTIONS[i % 4]),
                        Message::new("assistant", REPLIES[i % 4]),
                    ],
                    add_generation_prompt: false,
                    mask: VerbMask::None,
                },
                qa: i % 3,
            })
            .collect();
        let config = ControlConfig {
            batch_size: batch,
            samples: samples.len(),
            // LQA_BENCH_RECOMPUTE=1: blocks recomputed in the backward pass (less memory)
            recompute: std::env::var("LQA_BENCH_RECOMPUTE").is_ok_and(|v| v == "1"),
            ..ControlConfig::paper()
        };
        let mut opt = ControlOptimizer::with_samples(
            &decoder,
            control.clone(),
            &samples,
            config,
            Vec::new(),
        )?;
        let rss_loaded = common::rss_mib("VmRSS:");
        common::reset_peak();
        opt.step()?;
        let mut times = Vec::new();
        for _ in 0..runs {
            times.push(opt.step()?.seconds);
        }
        let peak = common::rss_mib("VmHWM:");
        let pt = common::pytorch(bench);
        let pt_s = pt["median_s"].as_f64().unwrap_or(f64::NAN);
        let med = common::median(times.clone());
        println!(
            "| control step, batch {batch} ({} params) | {med:.3} s | {:?} | {pt_s:.3} s | {:.2}x | {peak:.0} (loaded {rss_loaded:.0}) | {:.0} |",
            opt.num_parameters(),
            common::rounded(&times),
            med / pt_s,
            pt["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
        );
        common::report(bench, med, "s", peak);
        drop(opt);
    }
    Ok(())
}
