//! What a batcher measures: each kind of batch's cost by its row count, fitted as `a + b·rows`,
//! and its counters.

use std::collections::BTreeMap;
use std::time::Duration;

#[cfg(doc)]
use super::CrossStreamBatcher;
use super::SharedNetwork;
#[cfg(doc)]
use crate::model::kernels::KernelPolicy;

/// Measured seconds of a batched call by its row count, fitted as `a + b·rows`.
#[derive(Debug, Clone, Default)]
pub(super) struct CostFit {
    /// An exponential average of the seconds per row count.
    pub(super) seconds: BTreeMap<usize, f64>,
    /// Whether a batch of several streams' calls has been measured (until then the fit only
    /// knows calls of one stream, and whether batching pays is still to be found out).
    pub(super) shared: bool,
    /// Holds made to find that out ([`EXPLORING_HOLDS`] at most).
    pub(super) exploring_holds: u32,
    /// Batches of this kind run since a shared batch was last measured or a hold was last made
    /// to measure one (see [`REMEASURE_AFTER`]).
    pub(super) batches_since_shared: u32,
}

/// Holds past the deadline a batcher makes to measure a shared batch before it gives up and
/// judges by the device alone.
pub(super) const EXPLORING_HOLDS: u32 = 3;

/// On a GPU, where batching was judged not to pay, the batches of one kind after which a hold is
/// made again to measure a shared batch. Without it the judgement could never change: calls run
/// side by side measure no shared batch, and few calls alone. An H200 run locked itself out so:
/// after three shared batches at 2 streams (costs timed while other streams' transfers shared
/// the device's queue), none at 4 and 8 streams, where batching gave 1.6–1.8× the throughput
/// in another process.
pub(super) const REMEASURE_AFTER: u32 = 64;

impl CostFit {
    pub(super) fn record(&mut self, rows: usize, seconds: f64) {
        self.seconds
            .entry(rows)
            .and_modify(|s| *s = 0.7 * *s + 0.3 * seconds)
            .or_insert(seconds);
    }

    /// `(a, b)` of the least-squares line through the measured points; with one point, the line
    /// through the origin (a pessimistic guess for a GPU, where a batch has a fixed cost).
    pub(super) fn line(&self) -> Option<(f64, f64)> {
        let n = self.seconds.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            let (&rows, &s) = self.seconds.iter().next()?;
            return Some((0.0, s / rows.max(1) as f64));
        }
        let mean_x = self.seconds.keys().map(|&r| r as f64).sum::<f64>() / n as f64;
        let mean_y = self.seconds.values().sum::<f64>() / n as f64;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (&rows, &s) in &self.seconds {
            let dx = rows as f64 - mean_x;
            sxy += dx * (s - mean_y);
            sxx += dx * dx;
        }
        let b = (sxy / sxx).max(0.0);
        let a = (mean_y - b * mean_x).max(0.0);
        Some((a, b))
    }

    pub(super) fn estimate(&self, rows: usize) -> Option<Duration> {
        let (a, b) = self.line()?;
        Some(Duration::from_secs_f64((a + b * rows as f64).max(0.0)))
    }
}

/// One measured batch cost ([`CrossStreamBatcher::measured_costs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasuredCost {
    /// The network the batch ran.
    pub network: SharedNetwork,
    /// One row's input shape (latent or image, without the batch dimension).
    pub sample: Vec<usize>,
    /// Rows in the batch.
    pub rows: usize,
    /// The batch's time, averaged over the batches of this many rows.
    pub time: Duration,
}

/// Counters of a batcher, for tests and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Forward calls run.
    pub batches: u64,
    /// Streams' calls they served.
    pub calls: u64,
    /// Rows they computed.
    pub rows: u64,
    /// Calls that ran in a batch with at least one other stream's call.
    pub shared_calls: u64,
    /// The most calls one batch served.
    pub widest: u64,
    /// Batches whose cost was measured on its own (see `device_time`).
    pub timed: u64,
    /// Their time, summed: the wall time of the run and of the runner's wait for the device
    /// (on a CPU, the run), or the device's time between the batch's two events
    /// ([`KernelPolicy::cuda_batch_events`]). Against a run's wall time, how busy the batches
    /// kept the device.
    pub device_time: Duration,
}

impl BatchCounts {
    /// Counts one batch measured on its own, `time` on the device.
    pub(super) fn add_timed(&mut self, time: Duration) {
        self.timed += 1;
        self.device_time += time;
    }

    /// Counts one batch of `calls` calls and `rows` rows.
    pub(super) fn add_batch(&mut self, calls: u64, rows: usize) {
        self.batches += 1;
        self.calls += calls;
        self.rows += rows as u64;
        self.widest = self.widest.max(calls);
        if calls > 1 {
            self.shared_calls += calls;
        }
    }
}
