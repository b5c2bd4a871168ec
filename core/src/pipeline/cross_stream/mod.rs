//! Cross-stream batching: streams that share one loaded model (the pool hands them the same
//! [`StableDiffusionModels`]) also share its UNet calls, and those of its autoencoder and of the
//! ControlNets they share (one kind of batch per net).
//!
//! A UNet call at batch 1 leaves most of a large GPU idle, so N streams running their calls one
//! after another cost N times what one batched call costs. Here every stream keeps its own
//! thread and its own state (noise, stock noise, latent buffer, prompt, ControlNets); only the
//! UNet call meets the others'. A stream's call enters a queue; whichever waiting thread finds
//! the UNet free becomes the batch's runner: it takes the queued calls of the most urgent kind
//! (same latent shape, text shape, added conditioning, dtype and kernel policy), concatenates
//! their rows (each row keeps its own timestep, text embedding, noise and ControlNet residuals;
//! a stream without a ControlNet gets zero residuals, which adds nothing), runs one forward,
//! and hands each call its rows back. Calls that arrive while a batch runs wait for the next
//! one, so streams that run flat out fall into step by themselves.
//!
//! Deadlines. Each call carries its frame's deadline (the frame's arrival plus the stream's
//! budget: [`EngineSettings::frame_budget_ms`], else the spacing of its input frames). The
//! runner may hold a batch back for a stream that is expected soon (it called recently, from
//! another thread), but only while the batch still starts early enough to end before the
//! earliest deadline in it, by the measured cost of a batch of that many rows; it never holds
//! without a deadline. Calls are taken earliest deadline first, in arrival order among equal
//! deadlines (a call without a deadline counts as due a second after it came), so no stream
//! starves and streams of equal budget take turns.
//!
//! Alone, a stream's call finds the UNet free and no one to wait for, and runs as the same
//! single forward it always was.
//!
//! On a GPU with [`KernelPolicy::cuda_batch_events`], a thread of the batcher's own runs the
//! batches while several streams share it, and hands each call its rows with a CUDA event its
//! stream waits on, instead of waiting for the device first (docs/MULTI_STREAM.md, "Handing a
//! batch back").
//!
//! Admission. Each batcher measures the cost of its batches per row count and fits it as
//! `a + b·rows`; with each stream's other work per frame (encode, decode, ControlNets, …) and
//! budget it predicts the time a round (one frame of every stream) takes with one stream more
//! ([`admission`]), which is what the server answers a new stream with.
//!
//! [`StableDiffusionModels`]: crate::model::bundle::StableDiffusionModels
//! [`EngineSettings::frame_budget_ms`]: crate::params::EngineSettings::frame_budget_ms

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::model::bundle::StableDiffusionModels;
use crate::model::kernels::{KernelPolicy, QueuedWork};
use crate::model::unet::ControlResiduals;
use crate::{Error, Result};

mod admission;
mod calls;
mod cost;
#[cfg(test)]
mod tests;

pub use admission::{Admission, admission};
pub use calls::{BatchKind, ControlNetCall, SharedCall, SharedNetwork, UNetCall};
use calls::{SharedOutput, join_calls, join_controlnet_calls};
pub use cost::{BatchCounts, MeasuredCost};
use cost::{CostFit, EXPLORING_HOLDS, REMEASURE_AFTER};

/// The longest a test's lockstep ([`CrossStreamBatcher::set_lockstep_for_tests`]) holds a call.
const LOCKSTEP_WAIT: Duration = Duration::from_secs(2);

/// Most rows one batched call takes; the rest wait for the next call.
pub const MAX_BATCH_ROWS: usize = 64;

/// A call without a deadline is ordered as if due this long after it came.
const UNDATED_DUE: Duration = Duration::from_secs(1);

/// A member that has not called for this many of its own call intervals is not waited for.
const ACTIVE_INTERVALS: u32 = 3;

/// What a stream tells the batcher about itself, for holding batches and for admission.
#[derive(Debug, Clone, Default)]
struct Member {
    /// Model id and stream size, to match a new stream against (admission).
    label: MemberLabel,
    kind: Option<BatchKind>,
    /// Rows of its last call.
    rows: usize,
    last_call: Option<Instant>,
    last_thread: Option<ThreadId>,
    /// Exponential average of the spacing of its calls.
    interval: Option<Duration>,
    /// Its frame budget as set in its settings (`frame_budget_ms`), which admission holds it to.
    budget: Option<Duration>,
    /// Its frame's work besides the UNet call (encode, decode, ControlNets, pre/post).
    other_work: Option<Duration>,
    /// The part of `other_work` spent in its ControlNets (their calls, batched or not, and
    /// summing their residuals).
    controlnet_work: Option<Duration>,
    /// The part of `other_work` spent in its encoder and decoder calls (batched or not).
    autoencoder_work: Option<Duration>,
    /// Its last UNet call ran in a shared batch and its decode has not come yet: a decode
    /// batch may wait for it.
    decode_due: bool,
    /// The kind, time and rows of its last call of each ControlNet it runs, of the encoder and
    /// of the decoder (one a frame each, at the pace of its UNet calls).
    shared_calls: Vec<(BatchKind, Instant, usize)>,
}

impl Member {
    /// A frame the stream took without calling any network (the similar-image filter gave the
    /// last output again): its next calls are a spacing from now, not due now. Without this,
    /// batches held for a stream whose call was not coming, up to the hold's grace.
    fn frame_skipped(&mut self, now: Instant) {
        if self.last_call.is_some() {
            self.last_call = Some(now);
        }
        for (_, at, _) in &mut self.shared_calls {
            *at = now;
        }
        self.decode_due = false;
    }

    /// When the member last called a network that joins `kind`, and with how many rows: its
    /// UNet calls, or its calls of the same ControlNet. (Encoder and decoder batches have holds
    /// of their own: [`CrossStreamBatcher::hold_encode`], [`CrossStreamBatcher::hold_decode`].)
    fn last_call_of(&self, kind: &BatchKind) -> Option<(Instant, usize)> {
        match kind.network {
            SharedNetwork::UNet => {
                let joins = self.kind.as_ref().is_some_and(|k| k.joins(kind));
                self.last_call.filter(|_| joins).map(|at| (at, self.rows))
            }
            SharedNetwork::ControlNet => self
                .shared_calls
                .iter()
                .find(|(k, _, _)| k.joins(kind))
                .map(|&(_, at, rows)| (at, rows)),
            SharedNetwork::Encode | SharedNetwork::Decode => None,
        }
    }
}

/// The model and size a stream runs, as admission matches them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberLabel {
    /// `model_id` of the stream's parameters.
    pub model_id: String,
    /// Width and height in pixels.
    pub size: (usize, usize),
}

struct Pending {
    ticket: u64,
    member: u64,
    kind: BatchKind,
    rows: usize,
    deadline: Option<Instant>,
    due: Instant,
    /// When the call came: a hold's limits count from the first call of the batch.
    arrived: Instant,
    thread: ThreadId,
    call: SharedCall,
    /// The networks the call runs on (the batcher's own), for the batch runner's thread.
    models: Arc<StableDiffusionModels>,
    /// The work the calling thread had queued when it handed the call over (its inputs among
    /// it), for the thread that runs the batch to wait for (each thread has its own CUDA
    /// stream). Marked before the caller first waits, which is when another thread can take
    /// the call; `None` until then, and on the CPU.
    queued: Option<QueuedWork>,
}

#[derive(Default)]
struct BatchState {
    next_ticket: u64,
    next_member: u64,
    queue: Vec<Pending>,
    /// Batches running now (more than one only where batching does not pay).
    running: usize,
    /// Batches started so far.
    runs_started: u64,
    /// Whether batching pays, decided by a test instead of the measured costs.
    pays_override: Option<bool>,
    /// The kind whose next batch measures a shared batch again (see [`REMEASURE_AFTER`]).
    measure_next: Option<BatchKind>,
    /// That batch is running: calls that would run beside it wait, so that its cost is its own.
    measuring: bool,
    /// A test's stand-in for a GPU: batchers with the same group share one device's time in
    /// [`admission`], wherever they run.
    device_group_for_tests: Option<u64>,
    /// A test's rule that a batch waits (up to 2 s) until this many calls, or one of every
    /// member, are queued.
    lockstep_for_tests: Option<usize>,
    /// The threads that ran batches of several streams' calls, per network.
    shared_runners: HashMap<SharedNetwork, HashSet<ThreadId>>,
    /// Each finished call's rows, with the mark its caller's stream waits on before it uses
    /// them where the batch was handed back by events ([`Handback::Events`]).
    done: HashMap<u64, std::result::Result<HandedRows, String>>,
    /// Batches handed back by events whose device time is read once the device has run them.
    timings: Vec<TimedBatch>,
    /// A call asked for batches handed back by events on a GPU, which a thread of the
    /// batcher's own runs while several streams share it ([`CrossStreamBatcher::runner_wanted`]).
    events_asked: bool,
    /// A test's choice of that thread, whatever the device and policy.
    runner_for_tests: Option<bool>,
    /// The batcher's runner thread, while it runs.
    runner: Option<ThreadId>,
    /// Starting it failed: the streams' threads run the batches.
    runner_failed: bool,
    /// Batches the runner thread ran.
    runner_batches: u64,
    /// Every runner thread there has been (for tests).
    runner_threads: HashSet<ThreadId>,
    /// The last batches run, while a benchmark traces them ([`CrossStreamBatcher::trace`]).
    trace: Option<(usize, std::collections::VecDeque<BatchTrace>)>,
    members: HashMap<u64, Member>,
    costs: HashMap<BatchKind, CostFit>,
    counts: HashMap<SharedNetwork, BatchCounts>,
}

/// One call's rows, and the mark its caller's stream waits on before it uses them
/// ([`Handback::Events`]).
type HandedRows = (SharedOutput, Option<Arc<QueuedWork>>);

/// A batch's rows per call, and with [`Handback::Events`] its start and end marks.
type BatchOutputs = (Vec<SharedOutput>, Option<(QueuedWork, Arc<QueuedWork>)>);

/// Takes a call out of the batcher where its `submit` ends without its rows (an error or a
/// panic on the way): queued, it would hold the models (which hold the batcher) and could be
/// run for a caller that is gone.
struct Withdraw<'a> {
    batcher: &'a CrossStreamBatcher,
    /// The call's ticket while it is the batcher's.
    ticket: Option<u64>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            let mut s = self.batcher.lock();
            s.queue.retain(|p| p.ticket != ticket);
            s.done.remove(&ticket);
        }
    }
}

/// Settles a batch whose run or bookkeeping unwound past `run_batch`'s own catch: the batcher
/// no longer counts it as running, and its callers get an error instead of waiting for ever.
struct Unwinding<'a> {
    batcher: &'a CrossStreamBatcher,
    /// The calls still owed a result.
    tickets: Vec<u64>,
    /// The batch is still counted in `running`.
    running: bool,
}

impl Drop for Unwinding<'_> {
    fn drop(&mut self) {
        if self.tickets.is_empty() && !self.running {
            return;
        }
        let mut s = self.batcher.lock();
        if self.running {
            s.running = s.running.saturating_sub(1);
        }
        for &ticket in &self.tickets {
            s.done
                .entry(ticket)
                .or_insert_with(|| Err("the batch's bookkeeping panicked".into()));
        }
        drop(s);
        self.batcher.wake.notify_all();
    }
}

/// What a thread that may run batches does next.
enum Step {
    /// Runs this batch.
    Run(Vec<Pending>),
    /// Waits to be woken, or until the instant (a hold, the tests' lockstep).
    Wait(Option<Instant>),
}

/// The instants a hold is judged by.
#[derive(Debug, Clone, Copy)]
struct HoldTimes {
    /// When the first queued call of the batch came.
    since: Instant,
    /// The earliest deadline among them.
    earliest: Instant,
    now: Instant,
}

/// How the callers of a batch get their rows on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handback {
    /// As soon as the batch is queued: a stream alone, whose calls run on its own thread and
    /// stream (nothing to order, and no cost to measure).
    Queued,
    /// Once the running thread has waited for the device, so that the batch's cost is its
    /// wall time (the default, and the CPU's, where nothing is queued).
    Wait,
    /// As soon as the batch is queued, with a CUDA event marked after it that each caller's
    /// stream waits on; the cost is the device's time between two events, read later
    /// ([`KernelPolicy::cuda_batch_events`]).
    Events,
}

/// A batch handed back by events, whose device time is read once done.
struct TimedBatch {
    key: BatchKind,
    rows: usize,
    calls: u64,
    /// The thread that ran it, on whose stream it was queued.
    thread: ThreadId,
    start: Arc<QueuedWork>,
    end: Arc<QueuedWork>,
    /// The start and end marks of the batches other threads queued while this one was not
    /// yet known done: on other streams they may have run beside it on the device, and where
    /// one did, this cost is not its own. (Batches of one thread run in turn on its stream.)
    others: Vec<(Arc<QueuedWork>, Arc<QueuedWork>)>,
    /// No other batch began on the host while this one was queued.
    undisturbed: bool,
}

impl TimedBatch {
    /// Whether the batch marked by `start` and `end` ran on the device while this one did
    /// (this one is done). Where the device's answer is an error, assumed so.
    fn ran_beside(&self, (start, end): &(Arc<QueuedWork>, Arc<QueuedWork>)) -> bool {
        // Not started yet, now that this one is done: it runs after.
        match start.is_done() {
            Ok(true) => {}
            Ok(false) => return false,
            Err(_) => return true,
        }
        // Started after this one ended: no overlap.
        match self.end.seconds_since(start) {
            Ok(Some(ended_after_it_started)) if ended_after_it_started > 0.0 => {}
            Ok(Some(_)) => return false,
            _ => return true,
        }
        // Started before this one ended, and still running, or ended after this one started.
        match end.seconds_since(&self.start) {
            Ok(Some(ended_after_this_started)) => ended_after_this_started > 0.0,
            _ => true,
        }
    }
}

/// One batch as it ran, for a benchmark's timeline of a round
/// ([`CrossStreamBatcher::trace`]). Host times: with the default hand-back the run includes
/// the runner's wait for the device, so the gaps between one batch's end and the next's start
/// are the device's idle time too.
#[derive(Debug, Clone)]
pub struct BatchTrace {
    /// The network the batch ran.
    pub network: SharedNetwork,
    /// Streams' calls in it.
    pub calls: usize,
    /// Rows it computed.
    pub rows: usize,
    /// When its first call came.
    pub first_call: Instant,
    /// When its last call came.
    pub last_call: Instant,
    /// When it started.
    pub started: Instant,
    /// When its rows were handed back.
    pub ended: Instant,
}

/// The shared scheduler of one loaded model's UNet (see the module docs).
pub struct CrossStreamBatcher {
    state: Mutex<BatchState>,
    wake: Condvar,
    device: Device,
}

impl std::fmt::Debug for CrossStreamBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossStreamBatcher")
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// The counters of every batcher the process has had, per network, kept when a batcher goes
/// with its model (so that they only grow, as a monitoring counter must).
fn process_counts() -> &'static Mutex<HashMap<SharedNetwork, BatchCounts>> {
    static COUNTS: OnceLock<Mutex<HashMap<SharedNetwork, BatchCounts>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

/// The process's batching so far, per network in [`SharedNetwork::ALL`]'s order: calls, the
/// batches they ran as, rows, calls that shared a batch, and the widest batch (`/metrics`).
pub fn process_totals() -> Vec<(SharedNetwork, BatchCounts)> {
    let counts = process_counts()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    SharedNetwork::ALL
        .iter()
        .map(|n| (*n, counts.get(n).copied().unwrap_or_default()))
        .collect()
}

/// Every live batcher, for admission.
fn registry() -> &'static Mutex<Vec<Weak<CrossStreamBatcher>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<CrossStreamBatcher>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Batchers whose streams share one device's time, as [`admission`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceGroup {
    Gpu(candle_core::DeviceLocation),
    Test(u64),
}

impl CrossStreamBatcher {
    /// Which batchers' streams share this one's device time in [`admission`]: a GPU's, by its
    /// location; none on a CPU (see [`admission`]), unless a test said otherwise
    /// ([`Self::set_device_group_for_tests`]).
    fn device_group(&self) -> Option<DeviceGroup> {
        if let Some(group) = self.lock().device_group_for_tests {
            return Some(DeviceGroup::Test(group));
        }
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => None,
            gpu => Some(DeviceGroup::Gpu(gpu)),
        }
    }

    /// Makes [`admission`] count this batcher's streams with those of every batcher given the
    /// same `group`, as it counts the batchers of one GPU (`None`: by the device again), so that
    /// tests on a CPU check the rule.
    #[doc(hidden)]
    pub fn set_device_group_for_tests(&self, group: Option<u64>) {
        self.lock().device_group_for_tests = group;
    }

    /// A batcher for the UNet of a model on `device`.
    pub fn new(device: &Device) -> Arc<Self> {
        let batcher = Arc::new(Self {
            state: Mutex::new(BatchState::default()),
            wake: Condvar::new(),
            device: device.clone(),
        });
        let mut all = registry().lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&batcher));
        batcher
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters of the UNet's calls so far.
    pub fn counts(&self) -> BatchCounts {
        self.counts_of(SharedNetwork::UNet)
    }

    /// The counters of one network's calls so far.
    pub fn counts_of(&self, network: SharedNetwork) -> BatchCounts {
        let mut s = self.lock();
        self.collect_timings(&mut s);
        s.counts.get(&network).copied().unwrap_or_default()
    }

    /// How many threads have run batches of several streams' calls of `network` (tests: a
    /// batch runs on its longest-standing stream's thread).
    #[doc(hidden)]
    pub fn shared_batch_threads_for_tests(&self, network: SharedNetwork) -> usize {
        self.lock()
            .shared_runners
            .get(&network)
            .map_or(0, HashSet::len)
    }

    /// Keeps the last `capacity` batches' timeline from now on (`0`: stops), for a benchmark
    /// to print where a round's time goes; [`Self::take_trace`] hands it over.
    pub fn trace(&self, capacity: usize) {
        self.lock().trace = (capacity > 0).then(|| {
            (
                capacity,
                std::collections::VecDeque::with_capacity(capacity),
            )
        });
    }

    /// The traced batches, oldest first, and the trace starts again empty.
    pub fn take_trace(&self) -> Vec<BatchTrace> {
        match &mut self.lock().trace {
            Some((_, trace)) => trace.drain(..).collect(),
            None => Vec::new(),
        }
    }

    /// Starts [`BatchCounts::widest`] again (benchmarks read it per run).
    pub fn reset_widest(&self) {
        for counts in self.lock().counts.values_mut() {
            counts.widest = 0;
        }
    }

    /// Streams registered.
    pub fn members(&self) -> usize {
        self.lock().members.len()
    }

    /// Registers a stream; it leaves when the handle drops.
    pub fn join(self: &Arc<Self>, label: MemberLabel) -> BatchMember {
        let mut s = self.lock();
        let id = s.next_member;
        s.next_member += 1;
        s.members.insert(
            id,
            Member {
                label,
                ..Member::default()
            },
        );
        BatchMember {
            batcher: self.clone(),
            id,
        }
    }

    /// Records a measured batch cost of calls shaped as `call_shape` (a [`UNetCall`] or a
    /// [`ControlNetCall`]; tests and benchmarks seed the fit with it).
    #[doc(hidden)]
    pub fn record_cost(
        &self,
        call_shape: impl Into<SharedCall>,
        policy: KernelPolicy,
        rows: usize,
        d: Duration,
    ) {
        let key = BatchKind::of(&call_shape.into(), policy).cost_key();
        self.lock()
            .costs
            .entry(key)
            .or_default()
            .record(rows, d.as_secs_f64());
    }

    /// Every batch cost measured so far (an exponential average per row count, the device's
    /// time: a batch of several streams waits for the device), ordered by network, per-row
    /// shape and rows: where a round of many streams spends its time (the multi-stream
    /// benchmark prints it after each batched row).
    pub fn measured_costs(&self) -> Vec<MeasuredCost> {
        let mut s = self.lock();
        self.collect_timings(&mut s);
        let mut costs: Vec<MeasuredCost> = s
            .costs
            .iter()
            .flat_map(|(kind, fit)| {
                fit.seconds.iter().map(|(&rows, &seconds)| MeasuredCost {
                    network: kind.network,
                    sample: kind.sample.clone(),
                    rows,
                    time: Duration::from_secs_f64(seconds),
                })
            })
            .collect();
        let order = |n: SharedNetwork| SharedNetwork::ALL.iter().position(|&m| m == n);
        costs.sort_by(|a, b| {
            (order(a.network), &a.sample, a.rows).cmp(&(order(b.network), &b.sample, b.rows))
        });
        costs
    }

    /// Decides whether batching pays instead of the measured costs (`None`: measured again),
    /// so that a test of what batches compute does not depend on the machine's timing.
    #[doc(hidden)]
    pub fn set_batching_pays_for_tests(&self, pays: Option<bool>) {
        self.lock().pays_override = pays;
    }

    /// Makes every batch wait (up to 2 s a batch) until `calls` calls of its kind, or one of
    /// every member, are queued: batches a test's streams deterministically, whatever the
    /// machine's timing.
    #[doc(hidden)]
    pub fn set_lockstep_for_tests(&self, calls: Option<usize>) {
        self.lock().lockstep_for_tests = calls;
    }

    /// Makes the batcher's own thread run the batches while several streams share it
    /// (`Some(true)`), or never (`Some(false)`), whatever the device and kernel policy say
    /// (`None`: a GPU's policy decides, [`KernelPolicy::cuda_batch_events`]).
    #[doc(hidden)]
    pub fn set_runner_thread_for_tests(&self, on: Option<bool>) {
        self.lock().runner_for_tests = on;
        self.wake.notify_all();
    }

    /// Batches the batcher's own thread has run.
    #[doc(hidden)]
    pub fn runner_thread_batches_for_tests(&self) -> u64 {
        self.lock().runner_batches
    }

    /// Whether every batch of several streams' calls of `network` ran on a runner thread of
    /// the batcher's own (and one did run).
    #[doc(hidden)]
    pub fn shared_batches_ran_on_runner_threads_for_tests(&self, network: SharedNetwork) -> bool {
        let s = self.lock();
        s.shared_runners
            .get(&network)
            .is_some_and(|threads| !threads.is_empty() && threads.is_subset(&s.runner_threads))
    }

    /// Replaces the measured cost of every kind its streams run by exactly `per_row` a row
    /// (tests of admission through the server, which then need no timing).
    #[doc(hidden)]
    pub fn set_cost_per_row_for_tests(&self, per_row: Duration) {
        let mut s = self.lock();
        let kinds: Vec<BatchKind> = s.members.values().filter_map(|m| m.kind.clone()).collect();
        for kind in kinds {
            let mut fit = CostFit::default();
            for rows in [1, 2] {
                fit.seconds
                    .insert(rows, per_row.as_secs_f64() * rows as f64);
            }
            s.costs.insert(kind.cost_key(), fit);
        }
    }

    /// Whether the runner should hold the batch of `kind` for a stream expected soon, and until
    /// when.
    /// The second value says whether it is a hold to find out whether batching pays.
    fn hold_until(
        &self,
        s: &BatchState,
        kind: &BatchKind,
        now: Instant,
    ) -> Option<(Instant, bool)> {
        let queued: Vec<&Pending> = s.queue.iter().filter(|p| p.kind.joins(kind)).collect();
        let earliest = queued.iter().filter_map(|p| p.deadline).min()?;
        // A hold's limits count from when the batch's first call came, not from this wake of
        // the runner (each submit wakes it, and a limit from `now` would move with every one).
        let since = queued.iter().map(|p| p.arrived).min()?;
        let outside = Self::outside_the_queue(s);
        let fit = s.costs.get(&kind.cost_key())?;
        let mut rows: usize = queued.iter().map(|p| p.rows).sum();
        let times = HoldTimes {
            since,
            earliest,
            now,
        };
        match kind.network {
            SharedNetwork::Decode => return self.hold_decode(s, kind, fit, rows, times),
            SharedNetwork::Encode => return self.hold_encode(s, kind, fit, rows, times),
            SharedNetwork::UNet | SharedNetwork::ControlNet => {}
        }
        let mut expected = Vec::new();
        for (id, m) in &s.members {
            let (Some((last, member_rows)), Some(interval), Some(_)) =
                (m.last_call_of(kind), m.interval, m.last_thread)
            else {
                continue;
            };
            // One that waits here already, or whose thread waits here for another stream's
            // call, cannot come before this batch runs.
            if !outside(*id, m) {
                continue;
            }
            if now.saturating_duration_since(last) > interval * ACTIVE_INTERVALS {
                continue;
            }
            expected.push((last + interval, member_rows, interval));
        }
        if expected.is_empty() {
            return None;
        }
        let queued_rows = rows;
        rows += expected.iter().map(|(_, r, _)| r).sum::<usize>();
        // How late past its usual time a stream is still waited for: a quarter of its spacing,
        // or one call's time where that is longer (a stream held up behind another's encode).
        let one_call = fit.estimate(queued_rows)?;
        let grace = |interval: Duration| (interval / 4).max(one_call);
        if Self::exploring(s, kind, self.remeasures(s, kind, queued_rows)) {
            // Until one shared batch is measured, whether batching pays is unknown: hold once
            // for the next stream due, at most two calls' time, deadline or not, to find out.
            let cap = since + one_call * 2;
            let until = expected
                .iter()
                .map(|(at, _, interval)| *at + grace(*interval))
                .min()?
                .min(cap);
            return (now < until).then_some((until, true));
        }
        let latest_start = earliest.checked_sub(fit.estimate(rows.min(MAX_BATCH_ROWS))?)?;
        if latest_start <= now && Self::batching_pays(s, kind, queued_rows, &self.device) {
            // The earliest deadline is lost whatever this batch does. A stream still due
            // within half a batch's fixed cost is worth that wait: its call in a batch of its
            // own would pay the whole fixed cost again and push every later batch back by it,
            // so that one late round splits the next (U(1) + U(7) where U(8) was due).
            let (fixed, _) = fit.line()?;
            let horizon = since.max(latest_start) + Duration::from_secs_f64(fixed / 2.0);
            let coming = expected
                .iter()
                .any(|(at, _, interval)| *at <= horizon && now <= *at + grace(*interval));
            return (coming && now < horizon).then_some((horizon, false));
        }
        // Hold only for streams that should arrive in time to go in, and not long past when
        // they should have come (one that stopped sending is not waited for to the deadline).
        let until = expected
            .iter()
            .filter(|(at, _, _)| *at <= latest_start)
            .map(|(at, _, interval)| *at + grace(*interval))
            .max()?
            .min(latest_start);
        (now < until).then_some((until, false))
    }

    /// A decode batch waits for the other streams of the shared UNet batch they all came from
    /// (they are right behind), at most one decode's time and never past the deadline while
    /// that can still be met; once it cannot, at most half a batch's fixed cost
    /// ([`Self::hold_for_behind`]).
    fn hold_decode(
        &self,
        s: &BatchState,
        kind: &BatchKind,
        fit: &CostFit,
        rows: usize,
        times: HoldTimes,
    ) -> Option<(Instant, bool)> {
        let outside = Self::outside_the_queue(s);
        let due: usize = s
            .members
            .iter()
            .filter(|&(id, m)| m.decode_due && outside(*id, m))
            .count();
        if due == 0 {
            return None;
        }
        let until = times.since + fit.estimate(rows)?;
        self.hold_for_behind(s, kind, fit, (rows, rows * (due + 1)), until, times)
    }

    /// An encode batch waits for the streams whose encode is due now by their pace (their
    /// last encode a call spacing ago), and for no stream longer than a batch's fixed cost:
    /// the streams of one round reach their encodes a fraction of a millisecond apart (the
    /// runner of the round's decode batch gets its rows first), and without a hold the first
    /// would encode alone and the rest in a second batch behind it, which costs the fixed part
    /// again (E(1) + E(7) where E(8) was due). A stream whose encode is due later than that is
    /// not waited for: its own batch costs no more than the wait. Never past the deadline
    /// while that can still be met; once it cannot, at most half the fixed cost.
    fn hold_encode(
        &self,
        s: &BatchState,
        kind: &BatchKind,
        fit: &CostFit,
        rows: usize,
        times: HoldTimes,
    ) -> Option<(Instant, bool)> {
        let (fixed, _) = fit.line()?;
        if !fit.shared || fixed <= 0.0 {
            return None;
        }
        let cap = times.since + Duration::from_secs_f64(fixed);
        let outside = Self::outside_the_queue(s);
        let mut coming_rows = 0;
        for (&id, m) in &s.members {
            let Some(interval) = m.interval else { continue };
            if !outside(id, m) {
                continue;
            }
            let Some(&(_, at, member_rows)) = m.shared_calls.iter().find(|(k, _, _)| k.joins(kind))
            else {
                continue;
            };
            // Due by its pace, a quarter of its spacing late at most, and before the cap.
            let due = at + interval;
            if due <= cap && times.now <= due + interval / 4 {
                coming_rows += member_rows;
            }
        }
        if coming_rows == 0 {
            return None;
        }
        self.hold_for_behind(s, kind, fit, (rows, rows + coming_rows), cap, times)
    }

    /// Whether a member may still call before the batch being planned runs: neither its call
    /// nor one from its thread (waiting there for another stream's call) is queued.
    fn outside_the_queue(s: &BatchState) -> impl Fn(u64, &Member) -> bool + '_ {
        move |id, m| {
            !s.queue
                .iter()
                .any(|p| p.member == id || m.last_thread.is_some_and(|thread| p.thread == thread))
        }
    }

    /// A hold until `until` for streams right behind a batch of `rows` rows (`all_rows` with
    /// them): never past the latest start that still ends the batch before its earliest
    /// deadline, while that can be met. Once it cannot, at most half the batch's fixed cost
    /// past the moment it was lost (or the first call came, if later), and only where batching
    /// pays: their calls in a batch of their own would pay the whole fixed cost again and push
    /// every later batch back by it, so that one late round splits the next.
    fn hold_for_behind(
        &self,
        s: &BatchState,
        kind: &BatchKind,
        fit: &CostFit,
        (rows, all_rows): (usize, usize),
        until: Instant,
        times: HoldTimes,
    ) -> Option<(Instant, bool)> {
        let latest_start = times.earliest.checked_sub(fit.estimate(all_rows)?);
        let until = match latest_start {
            Some(latest_start) if latest_start > times.now => until.min(latest_start),
            _ => {
                if !Self::batching_pays(s, kind, rows, &self.device) {
                    return None;
                }
                let (fixed, _) = fit.line()?;
                let lost = latest_start.map_or(times.since, |l| l.max(times.since));
                until.min(lost + Duration::from_secs_f64(fixed / 2.0))
            }
        };
        (times.now < until).then_some((until, false))
    }

    /// The calls of the batch to run now, as indices into the queue (sorted most urgent first):
    /// the most urgent call's kind, earliest deadline first, up to [`MAX_BATCH_ROWS`].
    fn plan_batch(queue: &[Pending], lead: usize) -> Vec<usize> {
        let mut kind = queue[lead].kind.clone();
        let mut rows = 0;
        let mut taken = Vec::new();
        let order = std::iter::once(lead).chain((0..queue.len()).filter(|&i| i != lead));
        for (i, p) in order.map(|i| (i, &queue[i])) {
            if p.kind.joins(&kind) && (taken.is_empty() || rows + p.rows <= MAX_BATCH_ROWS) {
                rows += p.rows;
                if kind.control.is_none() {
                    kind.control = p.kind.control.clone();
                }
                taken.push(i);
            }
        }
        taken.sort_unstable();
        taken
    }

    /// A queued call to run before the most urgent one: the encode (or other call) of a stream
    /// whose UNet call the most urgent UNet batch would wait for. It is quick, and then both
    /// UNet calls meet, where otherwise the UNet batch would run without that stream.
    fn unblocking_call(s: &BatchState, now: Instant) -> Option<usize> {
        let first = &s.queue.first()?.kind;
        if first.network != SharedNetwork::UNet {
            return None;
        }
        s.queue.iter().position(|p| {
            !p.kind.joins(first)
                && s.members.get(&p.member).is_some_and(|m| {
                    m.kind.as_ref().is_some_and(|k| k.joins(first))
                        && match (m.last_call, m.interval) {
                            (Some(last), Some(interval)) => {
                                now.saturating_duration_since(last) <= interval * ACTIVE_INTERVALS
                            }
                            _ => false,
                        }
                })
        })
    }

    fn submit(
        self: &Arc<Self>,
        member: u64,
        models: &Arc<StableDiffusionModels>,
        call: SharedCall,
        deadline: Option<Instant>,
    ) -> Result<SharedOutput> {
        let policy = KernelPolicy::current();
        let kind = BatchKind::of(&call, policy);
        let rows = call.rows()?;
        let now = Instant::now();
        let arrived = now;
        let thread = std::thread::current().id();
        // Declared before the lock's guard, so that an unwinding call drops the lock first.
        let mut withdraw = Withdraw {
            batcher: self,
            ticket: None,
        };
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.events_asked |= policy.cuda_batch_events && !self.device.is_cpu();
        // A stream's pace is that of its UNet calls, one a frame.
        if let Some(m) = s.members.get_mut(&member) {
            m.decode_due = false;
            if kind.network != SharedNetwork::UNet {
                m.shared_calls.retain(|(k, _, _)| !k.joins(&kind));
                m.shared_calls.push((kind.clone(), now, rows));
                // A stream that keeps changing nets remembers its latest few.
                if m.shared_calls.len() > 10 {
                    m.shared_calls.remove(0);
                }
            }
        }
        if let Some(m) = s
            .members
            .get_mut(&member)
            .filter(|_| kind.network == SharedNetwork::UNet)
        {
            if let Some(last) = m.last_call {
                let gap = now.saturating_duration_since(last);
                m.interval = Some(match m.interval {
                    Some(i) => i.mul_f64(0.7) + gap.mul_f64(0.3),
                    None => gap,
                });
            }
            m.last_call = Some(now);
            m.last_thread = Some(thread);
            m.kind = Some(kind.clone());
            m.rows = rows;
        }
        s.queue.push(Pending {
            ticket,
            member,
            kind: kind.clone(),
            rows,
            deadline,
            due: deadline.unwrap_or(now + UNDATED_DUE),
            arrived,
            thread,
            call,
            models: models.clone(),
            queued: None,
        });
        withdraw.ticket = Some(ticket);
        self.wake.notify_all();
        loop {
            if let Some(result) = s.done.remove(&ticket) {
                withdraw.ticket = None;
                drop(s);
                let (out, end) = result.map_err(Error::State)?;
                if let Some(end) = end {
                    // This thread's stream waits for the batch (queued on the runner's) before
                    // it reads the rows or frees anything the batch read. Should that fail (an
                    // error another thread's release left for the next call binding the
                    // context comes out of whichever call that is), the host waits instead,
                    // so that nothing is freed under the batch, and the rows are good.
                    if let Err(e) = end.wait_here(&self.device) {
                        end.wait_host()?;
                        tracing::warn!(
                            "a batched {:?} call's stream could not wait on the device for its \
                             batch ({e}); the host waited instead",
                            kind.network
                        );
                    }
                }
                return Ok(out);
            }
            let pays = Self::batching_pays(&s, &kind, rows, &self.device);
            if s.running > 0 {
                let mine = s.queue.iter().position(|p| p.ticket == ticket);
                match mine {
                    // Batching would save nothing here (a CPU, where a call's cost grows with its
                    // rows): run this call beside the one running, as separate engines would.
                    Some(i) if !pays && !s.measuring => {
                        let call = s.queue.remove(i);
                        s = self.run_batch(s, models, vec![call]);
                    }
                    _ => {
                        self.mark_before_waiting(&mut s, ticket)?;
                        s = self.wait(s, None);
                    }
                }
                continue;
            }
            if self.runner_wanted(&s) {
                // The batcher's own thread runs the batches (it is woken by this call's
                // submit); this one waits for its rows.
                self.start_runner(&mut s);
                if s.runner.is_some() {
                    self.mark_before_waiting(&mut s, ticket)?;
                    s = self.wait(s, None);
                    continue;
                }
            }
            s = match self.next_step(&mut s, Some(ticket)) {
                Step::Run(batch) => self.run_batch(s, models, batch),
                Step::Wait(until) => {
                    self.mark_before_waiting(&mut s, ticket)?;
                    self.wait(s, until)
                }
            };
        }
    }

    /// Marks the work the calling thread has queued (its call's inputs among it), before it
    /// waits and another thread may take its call, unless that is done or its call is gone.
    fn mark_before_waiting(&self, s: &mut BatchState, ticket: u64) -> Result<()> {
        if self.device.is_cpu() {
            return Ok(());
        }
        if let Some(p) = s
            .queue
            .iter_mut()
            .find(|p| p.ticket == ticket && p.queued.is_none())
        {
            p.queued = Some(QueuedWork::mark(&self.device)?);
        }
        Ok(())
    }

    /// Waits for the batcher's condition variable, until `until` at most.
    fn wait<'a>(
        &'a self,
        s: MutexGuard<'a, BatchState>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, BatchState> {
        match until {
            None => self.wake.wait(s).unwrap_or_else(PoisonError::into_inner),
            Some(until) => {
                let wait = until.saturating_duration_since(Instant::now());
                self.wake
                    .wait_timeout(s, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        }
    }

    /// The next batch to run, or how long to wait for one, for a thread that may run batches
    /// while none runs: `me`, a call's ticket, where the calling stream's thread asks (it runs
    /// only a batch that holds its call and no lower member's), `None` for the runner thread.
    fn next_step(&self, s: &mut BatchState, me: Option<u64>) -> Step {
        if s.queue.is_empty() {
            return Step::Wait(None);
        }
        let now = Instant::now();
        s.queue.sort_by_key(|p| (p.due, p.ticket));
        let lead = Self::unblocking_call(s, now).unwrap_or(0);
        let plan = Self::plan_batch(&s.queue, lead);
        // A batch runs on the thread of one of its calls (under that call's kernel policy,
        // counted on that thread), so a stream alone runs on its own thread as before: the
        // call of the longest-standing stream (the lowest member id), so that on a GPU the
        // batches holding that stream keep to its thread, whose CUDA graphs they replay
        // (graphs are kept per thread: any call's thread would capture a graph of each batch
        // width in turn). The others wait to be woken.
        if let Some(me) = me {
            let runner = plan
                .iter()
                .min_by_key(|&&i| (s.queue[i].member, s.queue[i].ticket))
                .map(|&i| s.queue[i].ticket);
            if runner != Some(me) {
                return Step::Wait(None);
            }
        }
        let first_kind = s.queue[lead].kind.clone();
        let lead_rows = s.queue[lead].rows;
        if let Some(calls) = s.lockstep_for_tests {
            let wanted = calls.min(s.members.len());
            let since = plan
                .iter()
                .map(|&i| s.queue[i].arrived)
                .min()
                .unwrap_or(now);
            if plan.len() < wanted && now.saturating_duration_since(since) < LOCKSTEP_WAIT {
                return Step::Wait(Some(now + Duration::from_millis(5)));
            }
        }
        let pays = Self::batching_pays(s, &first_kind, lead_rows, &self.device);
        let worth =
            pays || Self::exploring(s, &first_kind, self.remeasures(s, &first_kind, lead_rows));
        if worth && let Some((until, exploring)) = self.hold_until(s, &first_kind, now) {
            let key = first_kind.cost_key();
            let mut again = false;
            if exploring && let Some(fit) = s.costs.get_mut(&key) {
                if fit.shared {
                    // Measuring again: one hold per REMEASURE_AFTER batches, and the next
                    // batch of the kind runs with no other beside it.
                    fit.batches_since_shared = 0;
                    again = true;
                } else {
                    fit.exploring_holds += 1;
                }
            }
            if again {
                s.measure_next = Some(key);
            }
            return Step::Wait(Some(until));
        }
        let mut batch = Vec::with_capacity(plan.len());
        for &i in plan.iter().rev() {
            batch.push(s.queue.remove(i));
        }
        batch.reverse();
        Step::Run(batch)
    }

    /// Whether the batcher's own thread runs the batches: several streams share it and one
    /// asked for batches handed back by events on a GPU ([`KernelPolicy::cuda_batch_events`]),
    /// or a test asked for it. Every batch then runs on one thread and one CUDA stream: its
    /// graphs are captured once per batch width (on the streams' threads, a batch that lacks
    /// the longest-standing stream, and every batch once that stream leaves, moved to
    /// another thread, which captured its graphs again, 40 to 100 ms a width at 512²), the
    /// device runs the batches in the order they were queued, and each one's time on the
    /// device is its own.
    fn runner_wanted(&self, s: &BatchState) -> bool {
        s.members.len() > 1 && Self::runner_lives(s)
    }

    /// Whether the runner thread, once started, stays: while any stream is a member. With one
    /// left it runs nothing (the stream runs its calls on its own thread, as alone) but keeps
    /// its CUDA graphs, cuDNN and cuBLASLt state for when a second comes back; a server
    /// passing through one stream would otherwise capture every batch width again.
    fn runner_lives(s: &BatchState) -> bool {
        !s.members.is_empty() && !s.runner_failed && s.runner_for_tests.unwrap_or(s.events_asked)
    }

    /// Starts the runner thread unless it runs.
    fn start_runner(self: &Arc<Self>, s: &mut BatchState) {
        if s.runner.is_some() || s.runner_failed {
            return;
        }
        let batcher = Arc::downgrade(self);
        match std::thread::Builder::new()
            .name("sdstream-batches".into())
            .spawn(move || Self::run_batches(batcher))
        {
            Ok(handle) => {
                s.runner = Some(handle.thread().id());
                s.runner_threads.insert(handle.thread().id());
            }
            Err(e) => {
                tracing::warn!(
                    "the batch runner thread did not start ({e}); the streams' threads run \
                     their batches"
                );
                s.runner_failed = true;
            }
        }
    }

    /// The runner thread: runs the batches while several streams share the batcher, waits
    /// while one does, and ends when none does (a batcher wanted again starts another).
    fn run_batches(batcher: Weak<Self>) {
        let Some(b) = batcher.upgrade() else { return };
        // Its first calls may be event queries (the last runner's timings), which bind no
        // context themselves.
        if let Err(e) = crate::model::kernels::bind_to_thread(&b.device) {
            tracing::warn!("the batch runner thread could not bind its device: {e}");
        }
        // A panic outside a batch's own run and its bookkeeping (which `run_batch` settles)
        // would leave the streams waiting for a thread that is gone: they run their batches
        // again instead.
        if catch_unwind(AssertUnwindSafe(|| b.run_batches_while_wanted())).is_err() {
            let mut s = b.lock();
            s.runner = None;
            s.runner_failed = true;
            drop(s);
            tracing::error!(
                "the batch runner thread panicked; the streams' threads run their batches"
            );
            b.wake.notify_all();
        }
    }

    fn run_batches_while_wanted(&self) {
        let mut s = self.lock();
        loop {
            if !Self::runner_lives(&s) {
                s.runner = None;
                drop(s);
                // What it queued is done before its stream goes with it (callers wait on its
                // events; its graphs' buffers are freed later from other threads).
                let _ = self.device.synchronize();
                // The streams' threads run their batches again.
                self.wake.notify_all();
                return;
            }
            if !self.runner_wanted(&s) || s.running > 0 {
                s = self.wait(s, None);
                continue;
            }
            s = match self.next_step(&mut s, None) {
                Step::Run(batch) => {
                    s.runner_batches += 1;
                    let _policy = batch[0].kind.policy.enter();
                    let models = batch[0].models.clone();
                    self.run_batch(s, &models, batch)
                }
                Step::Wait(until) => self.wait(s, until),
            };
        }
    }

    /// Whether one batched call costs less than calls of their own: the measured cost has a
    /// fixed part above 5 % of a call of `rows` rows (a GPU's launches). Where it has not (a CPU,
    /// whose cost grows with the rows), calls side by side use its cores better than calls in
    /// turn. Until a shared batch has been measured, batching is assumed to pay on a GPU and
    /// not on a CPU.
    fn batching_pays(s: &BatchState, kind: &BatchKind, rows: usize, device: &Device) -> bool {
        if let Some(pays) = s.pays_override {
            return pays;
        }
        if s.lockstep_for_tests.is_some() {
            return true;
        }
        match s.costs.get(&kind.cost_key()) {
            Some(fit) if fit.shared && fit.seconds.len() >= 2 => match fit.line() {
                Some((a, b)) => a > 0.05 * (a + b * rows as f64),
                None => true,
            },
            // Not measured (yet, or after all its tries): a GPU's calls are launch-bound, a CPU's
            // are not. The holds of `exploring` try to measure a shared batch meanwhile.
            _ => !device.is_cpu(),
        }
    }

    /// Whether a hold should be made to measure a batch of several streams' calls of `kind`:
    /// none has been measured yet and holds to measure one are left, or (`remeasure`: on a GPU
    /// where batching is judged not to pay) [`REMEASURE_AFTER`] batches have run since the last
    /// measurement or hold.
    fn exploring(s: &BatchState, kind: &BatchKind, remeasure: bool) -> bool {
        match s.costs.get(&kind.cost_key()) {
            None => true,
            Some(fit) if !fit.shared => fit.exploring_holds < EXPLORING_HOLDS,
            Some(fit) => remeasure && fit.batches_since_shared >= REMEASURE_AFTER,
        }
    }

    /// Whether [`Self::exploring`] may measure again: on a GPU, where batching is judged not to
    /// pay for `rows` rows.
    fn remeasures(&self, s: &BatchState, kind: &BatchKind, rows: usize) -> bool {
        !self.device.is_cpu() && !Self::batching_pays(s, kind, rows, &self.device)
    }

    /// Runs `batch` with the lock released, then records it and hands the rows out.
    fn run_batch<'a>(
        &'a self,
        mut s: MutexGuard<'a, BatchState>,
        models: &StableDiffusionModels,
        batch: Vec<Pending>,
    ) -> MutexGuard<'a, BatchState> {
        // A cost measured beside another run is not the batch's own.
        let alone = s.running == 0;
        let key = batch[0].kind.cost_key();
        let measuring = s.measure_next.as_ref() == Some(&key);
        if measuring {
            s.measure_next = None;
            s.measuring = true;
        }
        let started_before = s.runs_started;
        // A stream alone runs as it always did: its work only queued on a GPU, not waited for.
        // With others, the batcher waits for the device, so that costs are the device's, or
        // (`cuda_batch_events`) times the batch on the device and hands it back at once.
        let settle = s.members.len() > 1;
        let handback = if !settle {
            Handback::Queued
        } else if !self.device.is_cpu() && batch[0].kind.policy.cuda_batch_events {
            Handback::Events
        } else {
            Handback::Wait
        };
        let timed = settle || self.device.is_cpu();
        self.collect_timings(&mut s);
        s.running += 1;
        s.runs_started += 1;
        drop(s);
        let mut unwinding = Unwinding {
            batcher: self,
            tickets: batch.iter().map(|p| p.ticket).collect(),
            running: true,
        };
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run(models, &batch, handback)))
            .unwrap_or_else(|panic| {
                Err(Error::State(format!(
                    "the batched {:?} call panicked: {}",
                    batch[0].kind.network,
                    crate::engine::panic_message(panic.as_ref())
                )))
            });
        // A failed batch may have queued reads of other threads' inputs before it failed: wait
        // for them too, before those threads drop (and free) what they handed in.
        if outcome.is_err() && settle {
            let _ = self.settle();
        }
        let ended = Instant::now();
        let elapsed = ended - started;
        let total_rows: usize = batch.iter().map(|p| p.rows).sum();
        let mut s = self.lock();
        if let Some((capacity, trace)) = &mut s.trace {
            if trace.len() == *capacity {
                trace.pop_front();
            }
            trace.push_back(BatchTrace {
                network: batch[0].kind.network,
                calls: batch.len(),
                rows: total_rows,
                first_call: batch.iter().map(|p| p.arrived).min().unwrap_or(started),
                last_call: batch.iter().map(|p| p.arrived).max().unwrap_or(started),
                started,
                ended,
            });
        }
        let undisturbed = alone && s.runs_started == started_before + 1;
        s.running -= 1;
        unwinding.running = false;
        if measuring {
            s.measuring = false;
        }
        let calls = batch.len() as u64;
        let network = batch[0].kind.network;
        s.counts
            .entry(network)
            .or_default()
            .add_batch(calls, total_rows);
        if calls > 1 {
            s.shared_runners
                .entry(network)
                .or_default()
                .insert(std::thread::current().id());
        }
        process_counts()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(network)
            .or_default()
            .add_batch(calls, total_rows);
        match outcome {
            Ok((outputs, timing)) => {
                let end = match timing {
                    Some((start, end)) => {
                        // Its cost is read once the device has run it, unless a batch another
                        // thread queued meanwhile ran beside it.
                        let here = std::thread::current().id();
                        let start = Arc::new(start);
                        let mut others = Vec::new();
                        for t in s.timings.iter_mut().filter(|t| t.thread != here) {
                            t.others.push((start.clone(), end.clone()));
                            others.push((t.start.clone(), t.end.clone()));
                        }
                        s.timings.push(TimedBatch {
                            key,
                            rows: total_rows,
                            calls,
                            thread: here,
                            start,
                            end: end.clone(),
                            others,
                            undisturbed,
                        });
                        Some(end)
                    }
                    None => {
                        let recorded = undisturbed && timed;
                        let seconds = recorded.then_some(elapsed.as_secs_f64());
                        Self::note_cost(&mut s, key, total_rows, calls, seconds);
                        None
                    }
                };
                for (p, out) in batch.iter().zip(outputs) {
                    s.done.insert(p.ticket, Ok((out, end.clone())));
                }
                // The streams of a shared UNet batch decode next, together if they can.
                if calls > 1 && batch[0].kind.network == SharedNetwork::UNet {
                    for p in &batch {
                        if let Some(m) = s.members.get_mut(&p.member) {
                            m.decode_due = true;
                        }
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                for p in &batch {
                    s.done.insert(p.ticket, Err(message.clone()));
                }
            }
        }
        unwinding.tickets.clear();
        self.wake.notify_all();
        s
    }

    /// Counts a batch of `kind` (`key`) in its cost fit: `seconds`, where it was measured on
    /// its own, is recorded for its rows.
    fn note_cost(
        s: &mut BatchState,
        key: BatchKind,
        rows: usize,
        calls: u64,
        seconds: Option<f64>,
    ) {
        if let Some(seconds) = seconds {
            let time = Duration::from_secs_f64(seconds.max(0.0));
            let counts = s.counts.entry(key.network).or_default();
            counts.add_timed(time);
            process_counts()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.network)
                .or_default()
                .add_timed(time);
        }
        let fit = if seconds.is_some() {
            Some(s.costs.entry(key).or_default())
        } else {
            s.costs.get_mut(&key)
        };
        if let Some(fit) = fit {
            if let Some(seconds) = seconds {
                fit.record(rows, seconds);
                fit.shared |= calls > 1;
            }
            fit.batches_since_shared = if seconds.is_some() && calls > 1 {
                0
            } else {
                fit.batches_since_shared.saturating_add(1)
            };
        }
    }

    /// Records the costs of the batches handed back by events that the device has run since
    /// the last look (their device time between their two marks), without waiting for the
    /// others. A batch that ran beside another thread's on the device is counted but not
    /// recorded, as a batch run beside another is not.
    fn collect_timings(&self, s: &mut BatchState) {
        for t in std::mem::take(&mut s.timings) {
            match t.end.is_done() {
                Ok(true) => {}
                Ok(false) => {
                    s.timings.push(t);
                    continue;
                }
                // The device's error reaches the streams through their own calls; this
                // batch's time is lost with it.
                Err(_) => {
                    Self::note_cost(s, t.key, t.rows, t.calls, None);
                    continue;
                }
            }
            let alone = t.undisturbed && !t.others.iter().any(|other| t.ran_beside(other));
            let seconds = t
                .end
                .seconds_since(&t.start)
                .ok()
                .flatten()
                .filter(|seconds| alone && seconds.is_finite() && *seconds >= 0.0);
            Self::note_cost(s, t.key, t.rows, t.calls, seconds);
        }
    }

    /// Runs one batch: a single call as it is, several concatenated and split again; with
    /// [`Handback::Events`], also the marks that time it and that its callers wait on.
    fn run(
        &self,
        models: &StableDiffusionModels,
        batch: &[Pending],
        handback: Handback,
    ) -> Result<BatchOutputs> {
        // The calls handed over by other threads: their inputs come from those threads' CUDA
        // streams, which nothing orders with this one.
        let here = std::thread::current().id();
        for p in batch.iter().filter(|p| p.thread != here) {
            if let Some(queued) = &p.queued {
                queued.wait_here(&self.device)?;
            }
        }
        // After the waits: the batch's time on the device starts when its stream gets here.
        let start = match handback {
            Handback::Events => Some(QueuedWork::mark_timed(&self.device)?),
            Handback::Queued | Handback::Wait => None,
        };
        if let [only] = batch {
            let out = only.call.run(models)?;
            return self.hand_back(vec![out], handback, start);
        }
        let mismatch = || Error::State("a batch holds calls of different networks".into());
        let joined = match &batch[0].call {
            SharedCall::UNet(_) => {
                let calls: Vec<&UNetCall> = batch
                    .iter()
                    .map(|p| match &p.call {
                        SharedCall::UNet(c) => Ok(c),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<_>>()?;
                SharedCall::UNet(join_calls(&calls)?)
            }
            SharedCall::ControlNet(_) => {
                let calls: Vec<&ControlNetCall> = batch
                    .iter()
                    .map(|p| match &p.call {
                        SharedCall::ControlNet(c) => Ok(c),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<_>>()?;
                SharedCall::ControlNet(join_controlnet_calls(&calls)?)
            }
            SharedCall::Encode(_) | SharedCall::Decode(_) => {
                let parts: Vec<Tensor> = batch
                    .iter()
                    .map(|p| match &p.call {
                        SharedCall::Encode(x) | SharedCall::Decode(x) => Ok(x.clone()),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<_>>()?;
                let x = Tensor::cat(&parts, 0)?;
                match batch[0].call {
                    SharedCall::Encode(_) => SharedCall::Encode(x),
                    _ => SharedCall::Decode(x),
                }
            }
        };
        let out = joined.run(models)?;
        // On a GPU each call gets its rows in a buffer of its own, copied here before the
        // wait: views of one shared buffer would free it on the stream of whichever thread
        // dropped its view last, while the others' reads of their rows may still be queued on
        // theirs, and that thread's next allocation could then take the memory (the device's
        // memory pool orders a free only on the stream that made it). On the CPU nothing is
        // queued, and the views cost nothing.
        let own = !self.device.is_cpu();
        let mut outputs = Vec::with_capacity(batch.len());
        let mut row = 0;
        for p in batch {
            let rows = out.narrow(row, p.rows)?;
            outputs.push(if own { rows.owned()? } else { rows });
            row += p.rows;
        }
        self.hand_back(outputs, handback, start)
    }

    /// A batch's rows as its callers get them: after a wait for the device
    /// ([`Handback::Wait`]), or with the marks its callers' streams wait on
    /// ([`Handback::Events`]).
    fn hand_back(
        &self,
        outputs: Vec<SharedOutput>,
        handback: Handback,
        start: Option<QueuedWork>,
    ) -> Result<BatchOutputs> {
        match (handback, start) {
            (Handback::Events, Some(start)) => {
                let end = Arc::new(QueuedWork::mark_timed(&self.device)?);
                Ok((outputs, Some((start, end))))
            }
            (Handback::Wait, _) => {
                self.settle()?;
                Ok((outputs, None))
            }
            _ => Ok((outputs, None)),
        }
    }

    /// On a GPU the forward only queues work: wait for it, so that the measured cost is the
    /// device's (the streams wait for their rows right after anyway). A shared batch always
    /// has several members, so it always waits.
    fn settle(&self) -> Result<()> {
        if !self.device.is_cpu() {
            self.device.synchronize()?;
        }
        Ok(())
    }
}

/// A stream's place in a [`CrossStreamBatcher`]; leaves it when dropped.
pub struct BatchMember {
    batcher: Arc<CrossStreamBatcher>,
    id: u64,
}

impl std::fmt::Debug for BatchMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchMember").field("id", &self.id).finish()
    }
}

impl BatchMember {
    /// Runs `call` on the UNet of `models` (the batcher's own), in a batch with other streams' calls where
    /// they come in time; returns this call's rows of the prediction.
    pub fn forward(
        &self,
        models: &Arc<StableDiffusionModels>,
        call: UNetCall,
        deadline: Option<Instant>,
    ) -> Result<Tensor> {
        self.batcher
            .submit(self.id, models, SharedCall::UNet(call), deadline)?
            .into_tensor()
    }

    /// Runs `call` on its ControlNet, in a batch with other streams' calls of the same net where
    /// they come in time; returns this call's rows of the residuals (unscaled, as
    /// [`ControlNetModel::forward_embedded`] returns them).
    pub fn controlnet(
        &self,
        models: &Arc<StableDiffusionModels>,
        call: ControlNetCall,
        deadline: Option<Instant>,
    ) -> Result<ControlResiduals> {
        self.batcher
            .submit(self.id, models, SharedCall::ControlNet(call), deadline)?
            .into_residuals()
    }

    /// [`Autoencoder::encode_features`](crate::model::bundle::Autoencoder::encode_features) of frames `x`, in a batch with other streams' frames
    /// where they come in time.
    pub fn encode_features(
        &self,
        models: &Arc<StableDiffusionModels>,
        x: &Tensor,
        deadline: Option<Instant>,
    ) -> Result<Tensor> {
        self.batcher
            .submit(self.id, models, SharedCall::Encode(x.clone()), deadline)?
            .into_tensor()
    }

    /// [`Autoencoder::decode`](crate::model::bundle::Autoencoder::decode) of latents `z`, in a batch with other streams' latents where
    /// they come in time.
    pub fn decode(
        &self,
        models: &Arc<StableDiffusionModels>,
        z: &Tensor,
        deadline: Option<Instant>,
    ) -> Result<Tensor> {
        self.batcher
            .submit(self.id, models, SharedCall::Decode(z.clone()), deadline)?
            .into_tensor()
    }

    /// A frame taken without any network call (the similar-image filter skipped it): batches
    /// do not wait for this stream's calls until a spacing from now.
    pub fn frame_skipped(&self) {
        let mut s = self.batcher.lock();
        if let Some(m) = s.members.get_mut(&self.id) {
            m.frame_skipped(Instant::now());
        }
    }

    /// After a frame: the stream's budget, its frame's work besides the UNet call, and the parts
    /// of that spent in its ControlNets and in its encoder and decoder calls.
    pub fn frame_done(
        &self,
        budget: Option<Duration>,
        other_work: Duration,
        controlnet_work: Duration,
        autoencoder_work: Duration,
    ) {
        let average = |old: Option<Duration>, new: Duration| {
            Some(match old {
                Some(w) => w.mul_f64(0.7) + new.mul_f64(0.3),
                None => new,
            })
        };
        let mut s = self.batcher.lock();
        if let Some(m) = s.members.get_mut(&self.id) {
            m.budget = budget;
            m.other_work = average(m.other_work, other_work);
            m.controlnet_work = average(m.controlnet_work, controlnet_work);
            m.autoencoder_work = average(m.autoencoder_work, autoencoder_work);
        }
    }

    /// Sets what the stream would have measured: its call's shape, budget and other work (for
    /// tests of admission, which then need no timing).
    #[doc(hidden)]
    pub fn seed_for_tests(
        &self,
        call_shape: &UNetCall,
        policy: KernelPolicy,
        budget: Duration,
        other_work: Duration,
    ) {
        let mut s = self.batcher.lock();
        if let Some(m) = s.members.get_mut(&self.id) {
            m.kind = Some(BatchKind::of(&SharedCall::UNet(call_shape.clone()), policy));
            m.rows = call_shape.sample.dim(0).unwrap_or(1);
            m.budget = Some(budget);
            m.other_work = Some(other_work);
        }
    }

    /// Sets what the stream would have measured of a ControlNet it runs: a call shaped as
    /// `call_shape` made just now, and `controlnet_work` of its other work spent in its
    /// ControlNets (for tests of admission).
    #[doc(hidden)]
    pub fn seed_controlnet_for_tests(
        &self,
        call_shape: &ControlNetCall,
        policy: KernelPolicy,
        controlnet_work: Duration,
    ) {
        let kind = BatchKind::of(&SharedCall::ControlNet(call_shape.clone()), policy);
        let rows = call_shape.sample.dim(0).unwrap_or(1);
        let mut s = self.batcher.lock();
        if let Some(m) = s.members.get_mut(&self.id) {
            m.shared_calls.retain(|(k, _, _)| !k.joins(&kind));
            m.shared_calls.push((kind, Instant::now(), rows));
            m.controlnet_work = Some(controlnet_work);
        }
    }

    /// The batcher this stream belongs to.
    pub fn batcher(&self) -> &Arc<CrossStreamBatcher> {
        &self.batcher
    }
}

impl Drop for BatchMember {
    fn drop(&mut self) {
        let mut s = self.batcher.lock();
        s.members.remove(&self.id);
        drop(s);
        // A runner holding a batch for this stream stops waiting for it.
        self.batcher.wake.notify_all();
    }
}
