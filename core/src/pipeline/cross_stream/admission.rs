//! Admission: whether one more stream of a model and size keeps every stream within its frame
//! budget, predicted from the batches the batchers have measured.

use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::{
    ACTIVE_INTERVALS, BatchKind, BatchState, CrossStreamBatcher, MAX_BATCH_ROWS, Member,
    MemberLabel, SharedNetwork, registry,
};

/// The answer to "may one more stream of this model and size run here?".
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Streams of the same model and size running now.
    pub streams: usize,
    /// Predicted time for one frame of every stream of its model and size, the new one included
    /// (`None`: nothing is measured yet, so the stream is admitted).
    pub predicted_round: Option<Duration>,
    /// Streams of other models or sizes on the same GPU, whose frames share its time.
    pub other_streams: usize,
    /// Their predicted round (one frame of each), added to `predicted_round` before it is held
    /// to the budgets (zero where none are measured).
    pub other_round: Duration,
    /// The tightest frame budget among them all.
    pub tightest_budget: Option<Duration>,
    /// Why the stream is refused; `None` when it is admitted.
    pub refusal: Option<String>,
}

impl Admission {
    /// Whether the new stream may start.
    pub fn admitted(&self) -> bool {
        self.refusal.is_none()
    }
}

/// Whether a new stream of `label` with frame budget `budget` (`None`: the tightest budget of
/// the streams it joins) keeps every stream within its budget (the budgets set with
/// `frame_budget_ms`; streams without one are not refused for time), predicted from the batches
/// measured so far: a round of its model and size (one frame of each) costs a batched UNet call
/// of all their rows plus every stream's other work, and on a GPU the rounds of the other
/// models and sizes it runs come on top ([`Admission::other_round`]). On a CPU they do not:
/// there a batcher's costs are timed while the other engines' calls run beside them on the
/// cores, so their load is in the figures already.
pub fn admission(label: &MemberLabel, budget: Option<Duration>) -> Admission {
    let batchers: Vec<Arc<CrossStreamBatcher>> = registry()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    // The group the stream joins. Several batchers of one model (another dtype or device): the
    // busiest decides.
    let mut joined: Option<(GroupRound, usize)> = None;
    for (at, batcher) in batchers.iter().enumerate() {
        let s = batcher.lock();
        let peers: Vec<&Member> = s.members.values().filter(|m| &m.label == label).collect();
        if peers.is_empty() {
            continue;
        }
        let group = GroupRound::of(&s, &peers, true);
        if joined
            .as_ref()
            .is_none_or(|(b, _)| group.streams > b.streams)
        {
            joined = Some((group, at));
        }
    }
    let Some((group, at)) = joined else {
        return Admission {
            streams: 0,
            predicted_round: None,
            other_streams: 0,
            other_round: Duration::ZERO,
            tightest_budget: budget,
            refusal: None,
        };
    };
    // The other groups on its device, each without a new stream.
    let device = batchers[at].device_group();
    let mut others = Vec::new();
    for (i, batcher) in batchers.iter().enumerate() {
        if device.is_none() || batcher.device_group() != device {
            continue;
        }
        let s = batcher.lock();
        let mut labels: Vec<&MemberLabel> = Vec::new();
        for m in s.members.values() {
            let joins = i == at && &m.label == label;
            if !joins && !labels.contains(&&m.label) {
                labels.push(&m.label);
            }
        }
        for other in labels {
            let peers: Vec<&Member> = s.members.values().filter(|m| &m.label == other).collect();
            others.push(GroupRound::of(&s, &peers, false));
        }
    }
    group.admission(label, budget, &others)
}

/// What one group of streams (one model and size in one batcher) costs a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct GroupRound {
    streams: usize,
    /// UNet rows of the round.
    rows: usize,
    /// The round's UNet batches, ControlNet batches (where every net's cost is measured),
    /// encoder and decoder batches (where both costs are measured) and other work; `None`
    /// while the UNet's cost is not measured.
    unet: Option<Duration>,
    controlnets: Option<Duration>,
    pub(super) autoencoder: Option<Duration>,
    pub(super) other: Duration,
    /// The tightest budget among the group's streams.
    budget: Option<Duration>,
}

impl GroupRound {
    /// The round of `peers`, with one stream more (as wide as the widest, with the mean other
    /// work) when `joining`.
    pub(super) fn of(s: &BatchState, peers: &[&Member], joining: bool) -> GroupRound {
        let mut group = GroupRound {
            streams: peers.len(),
            budget: peers.iter().filter_map(|m| m.budget).min(),
            ..GroupRound::default()
        };
        let measured: Vec<&&Member> = peers.iter().filter(|m| m.kind.is_some()).collect();
        let Some(kind) = measured.first().and_then(|m| m.kind.clone()) else {
            return group;
        };
        let Some(fit) = s.costs.get(&kind.cost_key()) else {
            return group;
        };
        let rows_each = measured.iter().map(|m| m.rows).max().unwrap_or(1);
        let new_rows = if joining { rows_each } else { 0 };
        group.rows = peers
            .iter()
            .map(|m| if m.rows > 0 { m.rows } else { rows_each })
            .sum::<usize>()
            + new_rows;
        // Where every ControlNet the streams run has a measured batch cost, its calls are
        // predicted as batches (the shared time counted once) and taken out of each stream's
        // other work; otherwise each stream's ControlNet time stays in its other work. The
        // same for the encoder and decoder: a stream's time in a shared batch is the whole
        // batch's, so summing the streams' would count it once per stream.
        group.controlnets = shared_batches(s, peers, joining, &[SharedNetwork::ControlNet]);
        group.autoencoder = shared_batches(
            s,
            peers,
            joining,
            &[SharedNetwork::Encode, SharedNetwork::Decode],
        );
        let others: Vec<Duration> = peers
            .iter()
            .filter_map(|m| {
                let mut work = m.other_work?;
                if group.controlnets.is_some() {
                    work = work.saturating_sub(m.controlnet_work.unwrap_or_default());
                }
                if group.autoencoder.is_some() {
                    work = work.saturating_sub(m.autoencoder_work.unwrap_or_default());
                }
                Some(work)
            })
            .collect();
        let mean_other = if others.is_empty() || !joining {
            Duration::ZERO
        } else {
            others.iter().sum::<Duration>() / others.len() as u32
        };
        group.other = others.iter().sum::<Duration>() + mean_other;
        // Calls past the widest batch run in further batches.
        let batches = group.rows.div_ceil(MAX_BATCH_ROWS).max(1);
        group.unet = fit
            .estimate(group.rows.min(MAX_BATCH_ROWS))
            .map(|one| one * batches as u32);
        group
    }

    /// Its UNet, ControlNet, autoencoder and other time; `None` while the UNet's cost is not
    /// measured.
    pub(super) fn round(&self) -> Option<Duration> {
        Some(
            self.unet?
                + self.controlnets.unwrap_or_default()
                + self.autoencoder.unwrap_or_default()
                + self.other,
        )
    }

    /// The answer for a new stream of `label` (budget `budget`) joining this group, with the
    /// `others` on its device: refused when the rounds together exceed the tightest budget.
    fn admission(
        &self,
        label: &MemberLabel,
        budget: Option<Duration>,
        others: &[GroupRound],
    ) -> Admission {
        let budgets = std::iter::once(budget)
            .chain(std::iter::once(self.budget))
            .chain(others.iter().map(|o| o.budget));
        let tightest = budgets.flatten().min();
        let other_streams = others.iter().map(|o| o.streams).sum();
        let other_round: Duration = others.iter().filter_map(GroupRound::round).sum();
        let Some(own) = self.round() else {
            return Admission {
                streams: self.streams,
                predicted_round: None,
                other_streams,
                other_round,
                tightest_budget: tightest,
                refusal: None,
            };
        };
        let total = own + other_round;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let refusal = tightest.filter(|b| total > *b).map(|b| {
            let controlnets = match self.controlnets {
                Some(d) => format!("; ControlNet batches: {:.1} ms", ms(d)),
                None => String::new(),
            };
            let autoencoder = match self.autoencoder {
                Some(d) => format!("; encoder and decoder batches: {:.1} ms", ms(d)),
                None => String::new(),
            };
            let others = if other_streams > 0 {
                format!(
                    "; {other_streams} stream{} of other models or sizes on the device: {:.1} ms",
                    if other_streams == 1 { "" } else { "s" },
                    ms(other_round)
                )
            } else {
                String::new()
            };
            format!(
                "no capacity for another {} {}x{} stream: with {} running, one frame of each would \
                 take about {:.1} ms (a UNet batch of {} rows: {:.1} ms{controlnets}{autoencoder}; the other \
                 stages: {:.1} ms{others}), over the tightest frame budget of {:.1} ms",
                label.model_id,
                label.size.0,
                label.size.1,
                self.streams,
                ms(total),
                self.rows,
                ms(self.unet.unwrap_or_default()),
                ms(self.other),
                ms(b),
            )
        });
        Admission {
            streams: self.streams,
            predicted_round: Some(own),
            other_streams,
            other_round,
            tightest_budget: tightest,
            refusal,
        }
    }
}

/// The predicted time of one batch of each of `networks` the `peers` call (each ControlNet they
/// run, the encoder, the decoder: their recent calls of it, and, when `joining`, a new stream's
/// as wide as the widest of them: it is assumed to call what its peers call), by each one's
/// measured batch cost; `None` when they call none or one has no measured cost yet.
fn shared_batches(
    s: &BatchState,
    peers: &[&Member],
    joining: bool,
    networks: &[SharedNetwork],
) -> Option<Duration> {
    let now = Instant::now();
    // (cost key, rows of the peers' calls, widest call)
    let mut nets: Vec<(BatchKind, usize, usize)> = Vec::new();
    for m in peers {
        for (kind, at, rows) in &m.shared_calls {
            if !networks.contains(&kind.network) {
                continue;
            }
            // A net the stream stopped running is not counted.
            let recent = m
                .interval
                .is_none_or(|i| now.saturating_duration_since(*at) <= i * ACTIVE_INTERVALS);
            if !recent {
                continue;
            }
            let key = kind.cost_key();
            match nets.iter_mut().find(|(k, _, _)| *k == key) {
                Some(net) => {
                    net.1 += rows;
                    net.2 = net.2.max(*rows);
                }
                None => nets.push((key, *rows, *rows)),
            }
        }
    }
    if nets.is_empty() {
        return None;
    }
    nets.iter()
        .map(|(key, rows, widest)| {
            let rows = rows + if joining { *widest } else { 0 };
            let batch = s.costs.get(key)?.estimate(rows.min(MAX_BATCH_ROWS))?;
            Some(batch * rows.div_ceil(MAX_BATCH_ROWS) as u32)
        })
        .sum()
}
