//! A process-wide stop flag for Ctrl-C. Long Rust work (generation, training) calls [`check`]
//! between steps; the script engine polls [`requested`] on every operation. The first Ctrl-C asks
//! for a stop; a second one while the first is still pending ends the process (exit code 130),
//! for work that never checks the flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Install the Ctrl-C handler (once; later calls do nothing).
pub fn install_ctrlc_handler() {
    INSTALL.call_once(|| {
        let result = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C before the first was honoured: give up on a clean stop.
                eprintln!("\ninterrupted twice: exiting");
                std::process::exit(130);
            }
        });
        if let Err(e) = result {
            tracing::warn!("cannot install the Ctrl-C handler: {e}");
        }
    });
}

/// Has a stop been asked for (and not yet cleared)?
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Ask for a stop, as Ctrl-C does (for tests and for code that cancels work itself).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Forget a pending stop request (before starting new work).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}

/// `Err(Error::Interrupted)` when a stop was asked for.
pub fn check() -> Result<()> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

// No unit test here: the flag is process-wide, and setting it would stop whatever other test
// runs at the same time. tests/cli.rs interrupts a real `lqa` process instead.
