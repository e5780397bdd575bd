//! SIGINT / SIGTERM as a request to stop: the handler only sets a flag; the training loop checks
//! it after each step (agreed by all ranks), saves a checkpoint and exits 0. A second signal
//! while the first is being handled is not special-cased: the flag is already set.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_signal(_signum: i32) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Route SIGINT and SIGTERM to the stop flag (unix; elsewhere the default handlers stay).
pub fn install() {
    #[cfg(unix)]
    {
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        extern "C" {
            fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        }
        // SAFETY: `on_signal` is async-signal-safe (a single atomic store) and lives for the
        // whole program.
        unsafe {
            signal(SIGINT, on_signal);
            signal(SIGTERM, on_signal);
        }
    }
}

/// Whether a stop was requested since the program started.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}
