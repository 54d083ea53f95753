//! Benchmark (not a test): prefill tokens/s (128-token prompt), greedy decode tokens/s (64 new
//! tokens, KV cache) and peak RSS on the default model in f32, next to the PyTorch figures in
//! `../shared/reference/timing_results.json`. Median of 5 runs after 1 warm-up, as timing.py.
//!
//!     cargo bench --bench model            # LQA_BENCH_RUNS=N to change the number of runs
//!     LQA_BENCH_WEIGHTS=native cargo bench --bench model   # the `weights` load option

mod common;

use candle_core::{DType, Device};
use common::{median, reset_peak};
use lqa::generate::{generate, GenOptions};
use lqa::model::{Input, KvCache, Logits};
use std::time::Instant;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let runs: usize = std::env::var("LQA_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t0 = Instant::now();
    let weights = std::env::var("LQA_BENCH_WEIGHTS").unwrap_or_else(|_| "f32".into());
    let lm = lqa::lm::LanguageModel::load(
        lqa::sources::DEFAULT_MODEL,
        &lqa::lm::LoadOptions::default().with_weights(&weights, false)?,
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let m = &lm.model;
    let rss_loaded = rss_kib("VmRSS:") as f64 / 1024.0;
    // a 128-token prompt of real text
    let text = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg \
        combined movable metal type, oil-based inks and a wooden press adapted from wine making. Books became \
        cheaper, literacy spread across Europe, and scientists could share their results faster than ever. \
        Within fifty years, presses operated in more than two hundred cities, printing bibles, grammars, \
        almanacs and pamphlets that carried the ideas of the Renaissance and the Reformation to readers.";
    let mut ids = lm.tokenizer.encode(text)?;
    while ids.len() < 128 {
        ids.extend(ids.clone());
    }
    ids.truncate(128);

    reset_peak();
    let prefill = || -> anyhow::Result<f64> {
        let input = Input::left_padded(std::slice::from_ref(&ids), 0, &Device::Cpu)?
            .with_logits(Logits::Last);
        let mut cache = KvCache::new(m.n_layers());
        let t = Instant::now();
        let out = m.forward(&input, Some(&mut cache), None)?;
        let _ = out.logits.unwrap().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..2 {
        prefill()?;
    }
    let pre: Vec<f64> = (0..runs.max(5) * 2)
        .map(|_| prefill())
        .collect::<anyhow::Result<_>>()?;
    let pre_peak = rss_kib("VmHWM:") as f64 / 1024.0;

    reset_peak();
    let n_new = 64;
    let opts = GenOptions {
        max_new_tokens: n_new,
        ..Default::default()
    };
    let decode = || -> anyhow::Result<f64> {
        // generate() includes the prefill; time it separately and subtract, as timing.py times
        // the 64 single-token steps only.
        let t = Instant::now();
        let out = generate(m, std::slice::from_ref(&ids), 0, &opts, None)?;
        assert_eq!(out[0].len(), n_new);
        Ok(t.elapsed().as_secs_f64())
    };
    decode()?;
    let pre_med = median(pre.clone());
    let dec: Vec<f64> = (0..runs)
        .map(|_| decode().map(|t| t - pre_med))
        .collect::<anyhow::Result<_>>()?;
    let dec_peak = rss_kib("VmHWM:") as f64 / 1024.0;

    let pt_pre = common::pytorch("prefill");
    let pt_dec = common::pytorch("decode");
    let pre_tps = 128.0 / median(pre);
    let dec_tps = n_new as f64 / median(dec);
    let weight_bytes = m.weight_bytes().values().sum::<usize>();
    let weight_mib = weight_bytes as f64 / (1 << 20) as f64;
    let bw = common::bandwidth_gbs(weight_bytes);
    let bound = bw * 1e9 / weight_bytes as f64;
    println!("lqa model benchmark: SmolLM2-135M-Instruct, weights {weights} ({weight_mib:.0} MiB), {} threads, load {load_s:.2}s, RSS after load {rss_loaded:.0} MiB", candle_core::utils::get_num_threads());
    println!("| benchmark | lqa | PyTorch | ratio | lqa peak RSS MiB | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let pt_pre_tps = pt_pre["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let pt_dec_tps = pt_dec["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| prefill 128 tok | {pre_tps:.1} tok/s | {pt_pre_tps:.1} tok/s | {:.2}x | {pre_peak:.0} | {:.0} |",
        pre_tps / pt_pre_tps,
        pt_pre["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "| greedy decode 64 tok | {dec_tps:.1} tok/s | {pt_dec_tps:.1} tok/s | {:.2}x | {dec_peak:.0} | {:.0} |",
        dec_tps / pt_dec_tps,
        pt_dec["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "memory bandwidth {bw:.1} GB/s (measured now): decode bound {bound:.1} tok/s for {weight_mib:.0} MiB \
         of weights; decode at {:.0} % of it",
        100.0 * dec_tps / bound
    );
    // prefill's products: every block projection for each of the 128 tokens, the lm_head for
    // the last (attention's own products are under 5 % of these at 128 tokens)
    let macs: usize = m
        .linear_names()
        .iter()
        .filter_map(|n| m.linear(n))
        .map(|l| l.in_features() * l.out_features())
        .sum();
    let head = m
        .linear("lm_head")
        .map(|l| l.in_features() * l.out_features())
        .unwrap_or(0);
    let pre_gflop = 2.0 * ((macs - head) * 128 + head) as f64 / 1e9;
    let pre_of_bound = match common::compute_peak_gflops() {
        Some(peak) => {
            println!(
                "compute bound {peak:.0} GFLOPS (the packed microkernels on every thread, measured now): \
                 prefill runs {:.0} GFLOPS in its products, {:.0} % of it",
                pre_gflop * pre_tps / 128.0,
                100.0 * pre_gflop * pre_tps / 128.0 / peak
            );
            pre_gflop * pre_tps / 128.0 / peak
        }
        None => {
            println!("no packed kernels on this CPU: no compute bound measured");
            f64::NAN
        }
    };
    common::report_bound("prefill", pre_tps, "tok/s", pre_peak, pre_of_bound);
    common::report_bound("decode", dec_tps, "tok/s", dec_peak, dec_tps / bound);
    Ok(())
}
