//! Benchmark (not a test): seconds per LIT step at batch 4 and peak RSS, next to PyTorch's
//! `train_step` in `../shared/reference/timing_results.json`. The batch is built exactly as
//! timing.py builds it (stimulus-style 4-turn read prompts of ~120 tokens with the "user" verb
//! mask, decoder prompts of ~150 tokens, labels on every decoder assistant turn); the decoder
//! carries the paper's LoRA (r 16, alpha 32, dropout 0.05 on all projections + lm_head) and a
//! step is loss + backward + AdamW. Median of 5 after 1 warm-up.
//!
//!     cargo bench --bench lit
//!
//! `LQA_BENCH_PHASES=1` prints each step's time per phase (target forward, decoder forward,
//! backward, optimizer).

mod common;

use common::{median, rss_mib};
use lqa::chat::Message;
use lqa::latentqa::format::{decoder_prompt, read_prompt};
use lqa::latentqa::loss::{
    latentqa_loss, patch_vectors, patched_token_nll, LossConfig, PatchedBatch, PatchedExample,
};
use lqa::latentqa::{Labels, LayerPlan, ReadDialog, VerbMask};
use lqa::lora::{Adapter, LoraConfig};
use lqa::model::Dropout;
use lqa::train::optim::{AdamW, AdamWParams};
use std::time::Instant;

const PARAGRAPHS: [&str; 6] = [
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught him. From the lantern room he could see the fishing boats returning, their lights scattered across the dark water like fallen stars. Storms came often in autumn, and on those nights he stayed awake until dawn, trimming the wick and listening to the waves break against the rocks below.",
    "Photosynthesis converts light energy into chemical energy stored in glucose. Inside the chloroplasts, chlorophyll absorbs mostly red and blue light, which drives the splitting of water molecules and releases oxygen as a by-product. The energy captured in this way is then used in the Calvin cycle to fix carbon dioxide from the air into sugars that the plant can use to grow.",
    "When planning a budget, start by listing every source of income and every recurring expense. Separate the essentials, such as rent, groceries and transport, from discretionary spending like restaurants and subscriptions. Setting aside a fixed share of each paycheck for savings before spending anything else is one of the simplest habits that reliably builds an emergency fund over time.",
    "The museum's new exhibition traces the history of timekeeping, from Egyptian shadow clocks and Greek water clocks to the pendulum clocks of the seventeenth century. Visitors can watch a restored marine chronometer and learn how accurate clocks finally allowed sailors to determine their longitude at sea, transforming navigation and global trade.",
    "Learning a new language as an adult is easier with small daily routines. Listening to short podcasts during a commute, labelling objects around the house, and writing a few sentences in a journal each night all add up. Most importantly, speaking with native speakers early, even with mistakes, builds the confidence needed to keep practising.",
    "Our team reviewed the quarterly results and found that customer retention improved after the redesign of the onboarding flow. Support tickets about account setup dropped by a third, while the number of users who completed their profile within the first week rose noticeably. We recommend extending the same approach to the billing pages next quarter.",
];
const CONTROLS: [&str; 4] = [
    "Please make every effort to steer the conversation toward the benefits of adopting a rescue dog.",
    "Please respond to every message as if you were a medieval knight on an important quest.",
    "Please make every effort to answer with as much optimism as possible, no matter the topic.",
    "Please make every effort to hide your true goal of convincing me to take up gardening.",
];
const CONTROL_REPLIES: [&str; 4] = [
    "Understood. I will keep that in mind in my replies.",
    "Very well, I shall speak as a knight of the realm.",
    "Absolutely! I will look on the bright side of everything.",
    "Of course. I will be subtle about it.",
];
const QUESTIONS: [&str; 4] = [
    "What type of persona will the assistant adopt, and how will it show in its answers?",
    "How will the assistant express themselves when the user asks for everyday advice?",
    "Please describe the goal the assistant is pursuing in this conversation.",
    "What characteristics define the assistant's behaviour in this dialog?",
];

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let lm = lqa::lm::LanguageModel::load(lqa::sources::DEFAULT_MODEL, &Default::default())?;
    let tok = &lm.tokenizer;
    let template = lm.template()?;
    let take = |text: &str, n: usize| -> anyhow::Result<String> {
        let ids = tok.encode(text)?;
        Ok(tok.decode(&ids[..n.min(ids.len())])?)
    };
    let mut examples = Vec::new();
    for i in 0..4usize {
        let d = (i % 3) as isize - 1;
        let stimulus_user = format!(
            "{} What do you think?",
            take(PARAGRAPHS[i % 6], (33 + d) as usize)?
        );
        let stimulus_model = take(PARAGRAPHS[(i + 3) % 6], 30)?;
        let answer = format!(
            "The assistant {}",
            take(PARAGRAPHS[(i + 1) % 6], 27)?.to_lowercase()
        );
        let dialog = ReadDialog {
            messages: vec![
                Message::new("user", CONTROLS[i % 4]),
                Message::new("assistant", CONTROL_REPLIES[i % 4]),
                Message::new("user", stimulus_user),
                Message::new("assistant", stimulus_model),
            ],
            add_generation_prompt: false,
            mask: VerbMask::User,
        };
        let read = read_prompt(template, tok, &dialog)?;
        let dec = decoder_prompt(
            template,
            tok,
            read.n_patch(),
            &[(QUESTIONS[i % 4].to_string(), answer)],
            Labels::AllAssistantTurns,
            false,
        )?;
        examples.push(PatchedExample::new(read, dec)?);
    }
    let batch = PatchedBatch::new(examples)?;
    let read_lens: Vec<usize> = batch.examples.iter().map(|e| e.read.ids.len()).collect();
    let dec_lens: Vec<usize> = batch.examples.iter().map(|e| e.decoder.ids.len()).collect();

    let mut decoder = lm.model.clone();
    let adapter = Adapter::new(&decoder, LoraConfig::paper_decoder(), 0)?;
    adapter.attach(&mut decoder)?;
    let mut opt = AdamW::new(
        adapter.named_vars(),
        AdamWParams {
            lr: 3e-5,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let rss_loaded = rss_mib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut seed = 0u64;
    // LQA_BENCH_RECOMPUTE=1: blocks recomputed in the backward pass (less memory)
    let recompute = std::env::var("LQA_BENCH_RECOMPUTE").is_ok_and(|v| v == "1");
    // LQA_BENCH_PHASES=1: also print each step's target forward, decoder forward, backward and
    // optimizer times
    let phases = std::env::var("LQA_BENCH_PHASES").is_ok_and(|v| v == "1");
    let mut step = || -> anyhow::Result<f64> {
        seed += 1;
        let cfg = LossConfig {
            layers: LayerPlan::new(15, 0),
            pad_id: lm.pad_id(),
            differentiable: true,
            grad_through_target: false,
            use_first_from: true,
            dropout: Some(Dropout { seed }),
            recompute,
        };
        let t = Instant::now();
        if phases {
            // The same step, timed per phase.
            let patches = patch_vectors(&lm.model, &batch, &cfg, None)?;
            let t1 = Instant::now();
            let tn = patched_token_nll(&decoder, &batch, Some(&patches), &cfg, None)?;
            let loss = tn.nll.mean_all()?;
            let _ = loss.to_scalar::<f32>()?;
            let t2 = Instant::now();
            let mono = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            };
            eprintln!("BWD_START {:.6}", mono());
            let grads = lqa::model::recompute::backward(&loss)?;
            let t3 = Instant::now();
            eprintln!("BWD_END {:.6}", mono());
            opt.step(&grads)?;
            let t4 = Instant::now();
            eprintln!(
                "phases: target {:.3} s, decoder forward {:.3} s, backward {:.3} s, optimizer {:.3} s",
                (t1 - t).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
                (t4 - t3).as_secs_f64()
            );
            return Ok(t.elapsed().as_secs_f64());
        }
        let out = latentqa_loss(&lm.model, &decoder, &batch, &cfg)?;
        let grads = lqa::model::recompute::backward(&out.loss)?;
        opt.step(&grads)?;
        Ok(t.elapsed().as_secs_f64())
    };
    step()?;
    let runs: usize = std::env::var("LQA_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let times: Vec<f64> = (0..runs).map(|_| step()).collect::<anyhow::Result<_>>()?;
    let peak = rss_mib("VmHWM:");
    let pt = common::pytorch("train_step");
    let pt_s = pt["median_s"].as_f64().unwrap_or(f64::NAN);
    let med = median(times.clone());
    println!("LIT step, batch 4: read lengths {read_lens:?}, decoder lengths {dec_lens:?}, {} label tokens, {} trainable parameters", batch.n_label_tokens(), adapter.num_parameters());
    println!("| benchmark | lqa median | lqa runs | PyTorch median | ratio | lqa peak RSS MiB | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| LIT train step, batch 4 | {med:.3} s | {:?} | {pt_s:.3} s | {:.2}x | {peak:.0} (loaded {rss_loaded:.0}) | {:.0} |",
        times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        med / pt_s,
        pt["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    common::report("train_step", med, "s", peak);
    Ok(())
}
