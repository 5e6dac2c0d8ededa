//! The compute pool of the CPU step: persistent workers that spin between operations.
//!
//! A decode step of a small model is a few hundred operations of tens of microseconds each.
//! Through rayon every one of them wakes sleeping workers (a futex wake, on a VM an
//! inter-processor interrupt to a halted vCPU) and lets them fall asleep again: measured
//! ~12 % of the CPU time of a batch-1 decode in the scheduler (SmolLM2-135M f32, 2 threads,
//! `perf`). Here the calling thread publishes a task list, the workers — already spinning
//! since the previous operation — take task indices from one atomic counter, and the caller
//! works too and then waits for the last of them, as llama.cpp's thread pool does.
//!
//! Workers spin for [`SPIN`] after their last task (yielding the core between polls after
//! the first few microseconds, so a neighbour that needs it gets it), then sleep on a
//! condition variable until the next task list. The pool has as many threads as rayon's
//! global pool (set by `--threads` / `RAYON_NUM_THREADS`), the caller counted. A call made
//! from inside a task, or while another thread is using the pool, runs on the calling
//! thread.
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next task list before it sleeps.
const SPIN: Duration = Duration::from_micros(500);
/// Polls with only a pause instruction between them before a worker starts yielding.
const PAUSE_POLLS: u32 = 2_000;

/// One published task list: `f(i)` for every `i < tasks`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    /// Workers that have not finished with this job yet.
    pending: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Takes and runs tasks until none are left.
    fn drain(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.tasks {
                return;
            }
            (self.f)(i);
        }
    }
}

struct Pool {
    /// Threads including the caller.
    threads: usize,
    /// Bumped for every published job; workers wait for it to change.
    generation: AtomicUsize,
    job: AtomicPtr<Job<'static>>,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Held by the thread publishing jobs.
    busy: AtomicBool,
}

thread_local! {
    /// This thread is running a pool task (a worker, or a caller inside its job).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = rayon::current_num_threads().max(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            threads,
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
        }));
        for w in 1..threads {
            std::thread::Builder::new()
                .name(format!("lmgen-compute-{w}"))
                .spawn(move || pool.worker())
                .expect("cannot start a compute thread");
        }
        pool
    })
}

/// Threads that [`for_each`] runs tasks on, the caller included.
pub fn threads() -> usize {
    pool().threads
}

/// Runs `f(i)` for every `i < tasks` on the pool's threads (the caller among them) and
/// returns when all have finished. Tasks are taken in increasing order from a shared
/// counter, so give each a similar amount of work, a few times more tasks than threads.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    if tasks == 0 {
        return;
    }
    let p = pool();
    if tasks == 1 || p.threads == 1 || INSIDE.get() || p.busy.swap(true, Acquire) {
        (0..tasks).for_each(f);
        return;
    }
    let workers = p.threads - 1;
    let job = Job {
        f: &f,
        tasks,
        next: AtomicUsize::new(0),
        pending: AtomicUsize::new(workers),
        panicked: AtomicBool::new(false),
    };
    // SAFETY: the pointer is only dereferenced by workers between the generation bump
    // below and their decrement of `pending`, and this function does not return (or
    // unwind: `drain` runs under catch_unwind) before `pending` is 0.
    p.job
        .store(&job as *const Job as *mut Job<'static>, Release);
    p.generation.fetch_add(1, SeqCst);
    if p.sleepers.load(SeqCst) > 0 {
        let _g = p.lock.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    INSIDE.set(true);
    let mine = catch_unwind(AssertUnwindSafe(|| job.drain()));
    INSIDE.set(false);
    let mut polls = 0u32;
    while job.pending.load(Acquire) != 0 {
        backoff(&mut polls);
    }
    p.job.store(std::ptr::null_mut(), Relaxed);
    p.busy.store(false, Release);
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    if job.panicked.load(Relaxed) {
        panic!("a compute task panicked");
    }
}

/// Spin, then yield the core between polls.
#[inline]
fn backoff(polls: &mut u32) {
    if *polls < PAUSE_POLLS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *polls = polls.saturating_add(1);
}

impl Pool {
    fn worker(&'static self) {
        INSIDE.set(true);
        // Generation 0 is the one the pool was created with: a job may already have been
        // published by the time this thread runs, and it must take part in that one too.
        let mut seen = 0;
        loop {
            seen = self.wait_for_job(seen);
            let ptr = self.job.load(Acquire);
            // SAFETY: a job is published before the generation bump this worker saw, and
            // stays alive until every worker has decremented `pending` (see `for_each`).
            let job = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| job.drain())).is_err() {
                job.panicked.store(true, Relaxed);
            }
            job.pending.fetch_sub(1, Release);
        }
    }

    /// Returns the new generation once it differs from `seen`: polling for [`SPIN`], then
    /// asleep until woken.
    fn wait_for_job(&self, seen: usize) -> usize {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let g = self.generation.load(Acquire);
            if g != seen {
                return g;
            }
            backoff(&mut polls);
            if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                break;
            }
        }
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, SeqCst);
        loop {
            let g = self.generation.load(SeqCst);
            if g != seen {
                self.sleepers.fetch_sub(1, SeqCst);
                return g;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_task_once() {
        for tasks in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
            for_each(tasks, |i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "tasks={tasks}");
        }
    }

    #[test]
    fn nested_and_concurrent_calls_complete() {
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 4 * 200 * 8 * 3);
    }

    #[test]
    fn sleeping_workers_wake_up() {
        for _ in 0..3 {
            std::thread::sleep(SPIN * 4);
            let n = AtomicU64::new(0);
            for_each(64, |_| {
                n.fetch_add(1, Relaxed);
            });
            assert_eq!(n.load(Relaxed), 64);
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_survives() {
        let r = catch_unwind(|| {
            for_each(16, |i| {
                if i == 7 {
                    panic!("task 7");
                }
            })
        });
        assert!(r.is_err());
        let n = AtomicU64::new(0);
        for_each(16, |_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 16);
    }
}
