//! Benchmark (not a test): GFLOPS of the packed frozen products at the default model's shapes,
//! the forward `y = x W^T` against the backward `dx = dy W` of the same weight, alternating, on
//! a LIT step's row count (4 decoder prompts of ~150 tokens). Best of 5 rounds.
//!
//!     cargo bench --bench products        # LQA_BENCH_ROWS=N for another row count
//!     LQA_PACKED_BACKWARD=0 cargo bench --bench products   # the backward over the forward's panels

mod common;

use lqa::model::packed::{kernel, PackedWeight};
use std::hint::black_box;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let Some(kern) = kernel() else {
        println!("no packed kernels on this CPU");
        return Ok(());
    };
    let m: usize = std::env::var("LQA_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let val = |i: usize| ((i * 7919 % 101) as f32 - 50.0) * 1e-3;
    println!("rows {m}, {} threads", lqa::threads::num_threads());
    println!("| weight [n, k] | forward GFLOPS | backward GFLOPS | backward / forward |");
    println!("|---|---|---|---|");
    for (name, n, k) in [
        ("q/o", 576usize, 576usize),
        ("k/v", 192, 576),
        ("gate/up", 1536, 576),
        ("down", 576, 1536),
    ] {
        let w: Vec<f32> = (0..n * k).map(val).collect();
        let pw = PackedWeight::pack(&w, n, k, kern);
        let x: Vec<f32> = (0..m * k).map(|i| val(i + 3)).collect();
        let dy: Vec<f32> = (0..m * n).map(|i| val(i + 5)).collect();
        let flops = (2 * m * n * k) as f64;
        let reps = 10;
        let (mut fwd, mut bwd) = (0f64, 0f64);
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                black_box(pw.forward(&x, m));
            }
            fwd = fwd.max(flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for _ in 0..reps {
                black_box(pw.backward(&dy, m));
            }
            bwd = bwd.max(flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        println!(
            "| {name} [{n}, {k}] | {fwd:.0} | {bwd:.0} | {:.2} |",
            bwd / fwd
        );
    }
    Ok(())
}
