//! The kernels' worker threads: one persistent thread per CPU thread but the caller's, which
//! wait for work between kernels, so that a kernel's split costs a store and a wake-up, not a
//! thread's creation.
//!
//! A UNet step at 256² runs about 700 parallel kernels. Starting each one's threads anew (as
//! `std::thread::scope` does) cost a thread creation, a stack mapped and faulted in, and a join
//! apiece: tens of microseconds each, and the second core idle while it happened. Here a worker
//! that finishes a part spins for a short while ([`SPIN`]) before it parks, since the next
//! kernel usually comes within microseconds.
//!
//! One caller at a time has the pool. A second caller (another engine's thread, a test running
//! beside another) or a kernel started from inside a part runs on threads of its own for that
//! call, as before the pool existed: nothing waits for the pool and nothing deadlocks on it.
//!
//! Every part runs under the caller's [`KernelPolicy`]: [`run`] reads it once on the calling
//! thread and scopes it around each part it hands to another thread. The alternative, reading
//! the policy on the calling thread in every kernel and passing it down to its parts, would
//! hold only as long as no one ever adds a read inside a part; here a part cannot see another
//! policy than its caller's, wherever its reads are, for a thread-local store per part.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::policy::KernelPolicy;

/// How long a worker that finished a part, or a caller waiting for the workers, spins before it
/// parks. Between two kernels of a network the caller spends microseconds (allocating the next
/// output, candle's bookkeeping); parking and waking would cost about as much again.
const SPIN: Duration = Duration::from_micros(200);

/// The threads kernels split their work over: candle's CPU thread count (`RAYON_NUM_THREADS`,
/// else the physical cores), read once. candle reads it anew on every call, and on Linux that
/// reads /proc/cpuinfo: a visible cost at hundreds of kernels a step.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// One call's work, on the caller's stack until every part is done.
struct Job {
    /// The caller's `Fn(part)`, its lifetime erased: the caller does not return before
    /// `remaining` is zero, and no worker touches the job after its decrement.
    work: *const (dyn Fn(usize) + Sync + 'static),
    remaining: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    caller: Thread,
    /// The caller's policy, which the workers' parts run under.
    policy: KernelPolicy,
}

/// A worker's mailbox, on its own cache line so that the caller's store to one worker does not
/// disturb another's spinning. Worker `i` always runs part `i + 1`.
#[repr(align(64))]
struct Worker {
    job: AtomicPtr<Job>,
}

struct Pool {
    busy: AtomicBool,
    workers: Box<[Worker]>,
    threads: OnceLock<Box<[Thread]>>,
}

thread_local! {
    /// Set on the pool's workers: a kernel they start runs on threads of its own.
    static IS_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let count = threads() - 1;
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            busy: AtomicBool::new(false),
            workers: (0..count)
                .map(|_| Worker {
                    job: AtomicPtr::new(std::ptr::null_mut()),
                })
                .collect(),
            threads: OnceLock::new(),
        }));
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let spawned = std::thread::Builder::new()
                .name(format!("sdstream-kernel-{}", index + 1))
                .spawn(move || serve(&pool.workers[index], index + 1));
            match spawned {
                Ok(handle) => handles.push(handle.thread().clone()),
                // Fewer workers than threads: calls that need more run on threads of their own.
                Err(_) => break,
            }
        }
        let _ = pool.threads.set(handles.into_boxed_slice());
        pool
    })
}

/// A worker's life: wait for a job, run its part, report, wait again.
fn serve(worker: &Worker, part: usize) {
    IS_WORKER.with(|w| w.set(true));
    loop {
        let job = wait_for(|| {
            let job = worker.job.swap(std::ptr::null_mut(), Ordering::Acquire);
            (!job.is_null()).then_some(job)
        });
        // SAFETY: the caller keeps the job alive until `remaining` reaches zero, which this
        // worker's decrement below is part of; nothing here touches it after that decrement.
        let job = unsafe { &*job };
        let caller = job.caller.clone();
        // SAFETY: as above, the closure outlives the job.
        let work = unsafe { &*job.work };
        let policy = job.policy;
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            policy.scoped(|| work(part))
        })) {
            let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
        }
        if job.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            caller.unpark();
        }
    }
}

/// Spins on `ready` for [`SPIN`], then parks between tries; the thread's `unpark` ends a park.
fn wait_for<T>(mut ready: impl FnMut() -> Option<T>) -> T {
    let mut started: Option<Instant> = None;
    let mut tries = 0u32;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        tries = tries.wrapping_add(1);
        // The clock is read every 64 tries: a read costs about as much as the spin itself.
        if !tries.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let waited = started.get_or_insert_with(Instant::now).elapsed();
        if waited < SPIN / 8 {
            std::hint::spin_loop();
        } else if waited < SPIN {
            // Past the first stretch, let any other thread that wants this core have it (the
            // gemm crate's rayon workers run candle's f32 matmuls beside these).
            std::thread::yield_now();
        } else {
            // A wake-up given before this park makes it return at once: none is lost.
            std::thread::park();
        }
    }
}

/// Runs `work(part)` for every part in `0..parts`, part 0 on the calling thread and the others
/// at once on the pool's workers (or, when the pool is taken or too small, on threads started
/// for this call). Returns when every part has; a part's panic is raised here afterwards.
/// Every part runs under the caller's [`KernelPolicy::current`] (see the module's
/// documentation).
pub fn run(parts: usize, work: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        if parts == 1 {
            work(0);
        }
        return;
    }
    let pool = pool();
    let workers = pool.threads.get().map_or(0, |t| t.len());
    if parts - 1 > workers
        || IS_WORKER.with(|w| w.get())
        || pool
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return run_on_new_threads(parts, work);
    }
    // SAFETY (lifetime erasure): `run` waits below for every worker's decrement before it
    // returns or unwinds, and the workers never touch the job after it.
    let work_static: &(dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(work) };
    let job = Job {
        work: work_static,
        remaining: AtomicUsize::new(parts - 1),
        panic: Mutex::new(None),
        caller: std::thread::current(),
        policy: KernelPolicy::current(),
    };
    let threads = pool.threads.get().expect("workers started");
    for (worker, thread) in pool.workers.iter().zip(threads.iter()).take(parts - 1) {
        worker
            .job
            .store(&job as *const Job as *mut Job, Ordering::Release);
        thread.unpark();
    }
    let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(0)));
    wait_for(|| (job.remaining.load(Ordering::Acquire) == 0).then_some(()));
    pool.busy.store(false, Ordering::Release);
    if let Err(payload) = own {
        std::panic::resume_unwind(payload);
    }
    let worker_panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = worker_panic {
        std::panic::resume_unwind(payload);
    }
}

/// [`run`] on threads started for this call, part 0 on the calling thread; the first part's
/// panic (in part order) is raised after every thread has joined.
fn run_on_new_threads(parts: usize, work: &(dyn Fn(usize) + Sync)) {
    let policy = KernelPolicy::current();
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..parts)
            .map(|part| scope.spawn(move || policy.scoped(|| work(part))))
            .collect();
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(0)));
        let mut outcomes = vec![own];
        outcomes.extend(handles.into_iter().map(|h| h.join()));
        outcomes
    });
    for outcome in outcomes {
        if let Err(payload) = outcome {
            std::panic::resume_unwind(payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        for parts in 0..6 {
            let seen: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..200 {
                run(parts, &|part| {
                    seen[part].fetch_add(1, Ordering::Relaxed);
                });
            }
            for (part, count) in seen.iter().enumerate() {
                assert_eq!(count.load(Ordering::Relaxed), 200, "part {part} of {parts}");
            }
        }
    }

    #[test]
    fn the_workers_persist_between_calls() {
        if threads() < 2 {
            return; // one CPU thread: no workers to check
        }
        // Another test may hold the pool for a while (its callers then start threads of their
        // own); within a few seconds of tries, calls find it free.
        let mut on_workers = 0;
        for _ in 0..20_000 {
            let named = Mutex::new(None);
            run(2, &|part| {
                if part == 1 {
                    *named.lock().unwrap() = std::thread::current().name().map(str::to_owned);
                }
            });
            if named.into_inner().unwrap().as_deref() == Some("sdstream-kernel-1") {
                on_workers += 1;
                if on_workers == 10 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(on_workers, 10, "calls served by the persistent worker");
    }

    #[test]
    fn nested_and_concurrent_calls_finish() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        run(2, &|_| {
                            run(2, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 100 * 2 * 2);
    }

    #[test]
    fn a_part_s_panic_reaches_the_caller_after_every_part_ran() {
        let finished = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(2, &|part| {
                if part == 1 {
                    panic!("part one failed");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        let message = caught.expect_err("the panic is raised in the caller");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"part one failed"));
        assert_eq!(finished.load(Ordering::Relaxed), 1);
        // The pool is free again.
        let again = AtomicUsize::new(0);
        run(2, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 2);
    }
}
