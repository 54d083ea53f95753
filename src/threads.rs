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

/// Spin until `done()`, running the pool's pending work meanwhile (`rayon::yield_now`); after
/// 256 idle rounds each idle round gives the core up once (a system call that returns at once
/// unless another thread waits for this core: more workers than cores). With `give_up`, returns
/// `false` once that long has passed without work.
fn spin_until(done: impl Fn() -> bool, give_up: Option<std::time::Duration>) -> bool {
    let (mut idle, mut since) = (0u32, None);
    while !done() {
        if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
            (idle, since) = (0, None);
            continue;
        }
        if idle < 256 {
            idle += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        if let Some(limit) = give_up {
            if since.get_or_insert_with(std::time::Instant::now).elapsed() > limit {
                return false;
            }
        }
    }
    true
}

/// Run `work(t)` for `t` in `0..nt`, in parallel when `nt > 1`: this thread runs `work(0)`
/// and waits for the others spinning (taking pool work meanwhile), not sleeping.
///
/// A `join` (rayon's parallel iterators) whose first half ends a little before the second
/// sleeps on a futex after about 30 yields, and in a VM the wake-up takes tens of
/// microseconds: a decode step's product of 9 panels on 2 threads (4 and 5) ran at half the
/// bandwidth of one of 10 panels.
pub(crate) fn on_threads(nt: usize, work: impl Fn(usize) + Sync + Send) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    if nt == 1 {
        work(0);
        return;
    }
    /// Counts a part done when dropped, so that a part that panics is counted too (the scope
    /// then re-raises its panic).
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Release);
        }
    }
    let left = AtomicUsize::new(nt);
    let (work, left) = (&work, &left);
    rayon::scope(|s| {
        for t in 1..nt {
            s.spawn(move |_| {
                let _done = Done(left);
                work(t)
            });
        }
        {
            let _done = Done(left);
            work(0);
        }
        spin_until(|| left.load(Ordering::Acquire) == 0, None);
    });
}

thread_local! {
    /// Whether this worker is inside [`hot`] (a nested call has nothing to add).
    static HOT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether [`hot`] keeps workers awake (`LQA_HOT=0` turns it off, for A/B measurements).
fn hot_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LQA_HOT").is_ok_and(|v| v == "0"))
}

/// How long a kept-warm worker waits for pool work before it returns to rayon (and sleeps).
const WARM_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

/// Run `f` (on a pool worker) while the pool's other workers stay awake: each runs a job that
/// takes any pool work as soon as it appears (`rayon::yield_now`) and spins between, until `f`
/// returns or nothing came for [`WARM_IDLE`].
///
/// Between two parallel regions rayon's idle workers spin briefly, then sleep on a futex, and
/// the next region wakes them through the kernel. A decode step is hundreds of short parallel
/// regions with serial work between them: the sleeping and waking took about 10 % of each
/// thread's time. Kept warm, the other worker picks each region up without a system call.
///
/// Two `hot` calls on different workers (two forwards at once) may each end up running the
/// other's waiting job inside their own waits; a waiting job leaves after [`WARM_IDLE`] without
/// work, so neither waits on the other longer than that.
pub fn hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    install(|| {
        let p = pool();
        let me = p.current_thread_index();
        let others = p.current_num_threads().saturating_sub(1);
        if others == 0 || HOT.get() || !hot_enabled() {
            return f();
        }
        HOT.set(true);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        // the workers released however f ends
        struct Cool(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Cool {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
                HOT.set(false);
            }
        }
        let _cool = Cool(done);
        // one job queued on each worker (a plain spawn could be popped by this one)
        p.spawn_broadcast(move |ctx| {
            if Some(ctx.index()) == me {
                return;
            }
            spin_until(
                || flag.load(std::sync::atomic::Ordering::Acquire),
                Some(WARM_IDLE),
            );
        });
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn on_threads_runs_each_part_once_and_raises_a_parts_panic() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        install(|| {
            for nt in [1usize, 2, 3, 7] {
                let runs: Vec<AtomicUsize> = (0..nt).map(|_| AtomicUsize::new(0)).collect();
                on_threads(nt, |t| {
                    runs[t].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                    "{nt} parts"
                );
            }
            // a panicking part (the caller's own or another's) comes back as a panic, after
            // every other part has run, instead of a hang
            for bad in [0usize, 2] {
                let ran = AtomicUsize::new(0);
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    on_threads(3, |t| {
                        ran.fetch_add(1, Ordering::Relaxed);
                        if t == bad {
                            panic!("part {t}");
                        }
                    })
                }));
                assert!(r.is_err(), "the panic of part {bad} was lost");
                assert_eq!(ran.load(Ordering::Relaxed), 3);
            }
        });
    }

    /// `hot` gives back `f`'s value, nests, lets parallel work inside it use every worker, and
    /// a panic inside it comes back out and leaves the pool usable.
    #[test]
    fn hot_runs_work_and_releases_the_workers() {
        let total: u64 = hot(|| hot(|| (0..100_000u64).into_par_iter().map(|i| i % 7).sum()));
        assert_eq!(total, (0..100_000u64).map(|i| i % 7).sum::<u64>());
        let r = std::panic::catch_unwind(|| hot(|| panic!("inside hot")));
        assert!(r.is_err());
        let again: usize = hot(|| (0..1000usize).into_par_iter().sum());
        assert_eq!(again, 999 * 1000 / 2);
        // outside hot nothing is left spinning for long: the pool runs other work
        assert_eq!(install(|| (0..10usize).into_par_iter().count()), 10);
    }
}
