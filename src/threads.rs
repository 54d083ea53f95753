//! The one thread pool everything computes on.
//!
//! Two things made CPU work slow before this module, both found with perf on the default model:
//! - candle asks for its thread count on every matmul, and without `RAYON_NUM_THREADS` that
//!   means parsing `/proc/cpuinfo` (num_cpus' physical-core count) each time: ~11 % of a
//!   prefill, and a third of a decode step.
//! - A forward run from a thread outside the pool hands each matmul to the pool's workers and
//!   blocks; between matmuls the idle workers spin (`sched_yield`) on the same cores the caller
//!   needs for its serial work. Running the caller *on* a pool worker ([`install`]) leaves one
//!   fewer spinner and lets the caller take part in its own matmuls.
//!
//! - candle's elementwise ops run on its own "barrier pool", whose extra thread spins for 25k
//!   rounds after every op, competing with the matmul threads for the same two cores: 25 % of
//!   a control step. A short spin (then park) keeps its parallelism and frees the core.
//!
//! [`install`] is cheap when already on a worker, so the model calls it on every forward and
//! the CLI runs whole scripts inside it.

use std::sync::OnceLock;

/// Stack size of pool workers: scripts run on one and recurse on the native stack.
const STACK: usize = 256 << 20;

/// Rounds candle's barrier-pool worker spins before parking (candle's default is 25 000).
/// Measured on 2 cores: 500 gives +40 % prefill and -28 % control-step time over the default.
const BARRIER_SPIN: u32 = 500;

/// The number of compute threads: `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` if set, else
/// what candle would pick (physical cores).
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = num_threads();
        // Pin the count where candle looks for it first, so it stops re-reading /proc/cpuinfo.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_SPIN.to_string());
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .stack_size(STACK)
            .thread_name(|i| format!("lqa-{i}"))
            .build()
            .expect("cannot start the compute thread pool")
    })
}

/// Run `f` on a worker of the compute pool (directly if this thread already is one).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    if p.current_thread_index().is_some() {
        f()
    } else {
        p.install(f)
    }
}

/// Start the pool and pin the thread count: call once at start-up, before other threads run
/// (it may set `RAYON_NUM_THREADS`).
pub fn init() {
    let _ = pool();
}
