//! A process-wide stop flag (Ctrl-C): long work polls it, the REPL clears it.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Install the Ctrl-C handler that raises the flag (once; later calls do nothing).
pub fn install_ctrlc_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
    });
}

pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
pub fn clear() {
    STOP.store(false, Ordering::SeqCst);
}
/// `Err(interrupted)` once the flag is raised.
pub fn check() -> crate::Result<()> {
    if requested() {
        Err(crate::Error::invalid("interrupted"))
    } else {
        Ok(())
    }
}
