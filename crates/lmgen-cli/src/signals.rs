//! SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before a time limit, `scancel` or a
//! preemption): the job stops admitting work, writes every finished record, syncs the output
//! and its manifest and exits with [`EXIT_INTERRUPTED`]. Before the job writes anything
//! (reading, loading the model) the process exits at once; a second SIGTERM or SIGINT ends it
//! at once whatever it is doing.
use lmgen_core::job::EXIT_INTERRUPTED;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static WRITING: AtomicBool = AtomicBool::new(false);

/// The stop flag the engine checks before every step.
pub fn install() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT, SIGUSR1] {
        if sig != SIGUSR1 {
            // A second one while stopping: exit now.
            let _ = signal_hook::flag::register_conditional_shutdown(
                sig,
                EXIT_INTERRUPTED,
                stop.clone(),
            );
        }
        let flag = stop.clone();
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || {
                SIGNAL.store(sig, Ordering::SeqCst);
                flag.store(true, Ordering::SeqCst);
            })
        };
    }
    let flag = stop.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if flag.load(Ordering::SeqCst) && !WRITING.load(Ordering::SeqCst) {
            eprintln!(
                "lmgen: stopped by {} before any record was written; run again (with --resume) to do the job",
                name().unwrap_or("a signal")
            );
            std::process::exit(EXIT_INTERRUPTED);
        }
    });
    stop
}

/// From now on a signal is handled by the job (records are being written), not by exiting.
pub fn writing(on: bool) {
    WRITING.store(on, Ordering::SeqCst);
}

/// The signal received, if any (`SIGTERM`, `SIGINT`, `SIGUSR1`).
pub fn name() -> Option<&'static str> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        SIGTERM => Some("SIGTERM"),
        SIGINT => Some("SIGINT"),
        SIGUSR1 => Some("SIGUSR1"),
        _ => Some("a signal"),
    }
}
