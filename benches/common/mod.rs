//! Shared helpers of the benchmarks: RSS from /proc, medians, and the PyTorch figures.

#![allow(dead_code)]

/// A field of /proc/self/status in MiB (VmRSS, VmHWM).
pub fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Reset the peak RSS (VmHWM) so that it measures what follows.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Measured runs (`LQA_BENCH_RUNS`, default `default`).
pub fn runs(default: usize) -> usize {
    std::env::var("LQA_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One row of PyTorch's timing results by its `bench` name: `$LQA_BENCH_PYTORCH` (a
/// timing.py output from the same window, as `benches/side_by_side.py` passes it), else the
/// stored `../shared/reference/timing_results.json` (another day: context only).
pub fn pytorch(bench: &str) -> serde_json::Value {
    let path = std::env::var_os("LQA_BENCH_PYTORCH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/reference/timing_results.json")
        });
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v["results"]
                .as_array()
                .and_then(|a| a.iter().find(|r| r["bench"] == bench).cloned())
        })
        .unwrap_or_default()
}

/// One machine-readable figure, as timing.py names its benchmarks: a line `json: {...}` that
/// `benches/side_by_side.py` reads. `value` is seconds per step or tokens per second (`unit`).
pub fn report(bench: &str, value: f64, unit: &str, peak_rss_mib: f64) {
    println!(
        "json: {}",
        serde_json::json!({"bench": bench, "value": value, "unit": unit, "peak_rss_mib": peak_rss_mib})
    );
}

/// [`report`] with the figure's fraction of the machine's bound measured in the same run
/// (prefill: of the compute bound; decode: of the bandwidth bound).
pub fn report_bound(bench: &str, value: f64, unit: &str, peak_rss_mib: f64, of_bound: f64) {
    println!(
        "json: {}",
        serde_json::json!({"bench": bench, "value": value, "unit": unit,
                           "peak_rss_mib": peak_rss_mib, "of_bound": of_bound})
    );
}

/// The memory bandwidth in GB/s, measured now: the best of 5 multi-threaded streaming reads
/// (a sum) over a buffer of `bytes` (at least 256 MiB, so that caches don't serve it), on the
/// compute pool, on ordinary pages and on huge pages (as the packed weights are kept), the
/// faster of the two. Decoding reads every weight once per token, so `bandwidth / weight bytes`
/// is the most tokens per second it can reach.
pub fn bandwidth_gbs(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let n = bytes.max(256 << 20) / 4;
    let read = |buf: &[f32]| {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let s: f32 = buf
                    .par_chunks(1 << 16)
                    .map(|c| {
                        // 16 independent lanes, which the compiler turns into vector adds
                        let mut a = [0f32; 16];
                        for ch in c.chunks_exact(16) {
                            for (aj, v) in a.iter_mut().zip(ch) {
                                *aj += v;
                            }
                        }
                        a.iter().sum::<f32>()
                    })
                    .sum();
                std::hint::black_box(s);
                (n * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let fill = |b: &mut [f32]| {
        b.par_iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 7) as f32)
    };
    let small: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let on_small = read(&small);
    drop(small);
    let mut huge = lqa::model::huge_buf::HugeBuf::zeros(n);
    fill(&mut huge);
    on_small.max(read(&huge))
}

/// The f32 compute bound in GFLOPS: the packed microkernels (what the model's projections run)
/// on a 512 x 576 x 576 product whose weight stays in cache, on every thread, best of 5 runs of
/// 20 products. `None` where the CPU has no packed kernels.
pub fn compute_peak_gflops() -> Option<f64> {
    use lqa::model::packed::{kernel, PackedWeight};
    let kern = kernel()?;
    let (m, n, k) = (512usize, 576usize, 576usize);
    let w: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.01).collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.01).collect();
    let pw = PackedWeight::pack(&w, n, k, kern);
    std::hint::black_box(pw.forward(&x, m));
    let reps = 20;
    let best = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(pw.forward(&x, m));
            }
            (2 * m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max);
    Some(best)
}

/// Rounded run times for the table.
pub fn rounded(times: &[f64]) -> Vec<f64> {
    times
        .iter()
        .map(|t| (t * 1000.0).round() / 1000.0)
        .collect()
}

/// Run a benchmark as the lqa binary runs a script: tuned malloc, on the compute pool.
pub fn main(bench: fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    lqa::util::tune_allocator();
    lqa::threads::init();
    lqa::threads::install(bench)
}
