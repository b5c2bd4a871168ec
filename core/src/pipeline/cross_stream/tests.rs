use candle_core::DType;

use super::admission::GroupRound;
use super::*;

#[test]
fn the_cost_line_fits_the_points() {
    let mut fit = CostFit::default();
    assert_eq!(fit.estimate(4), None);
    fit.record(2, 0.010);
    // One point: through the origin.
    assert_eq!(fit.estimate(4), Some(Duration::from_secs_f64(0.020)));
    fit.record(4, 0.012);
    // 8 ms + 1 ms per row.
    let (a, b) = fit.line().unwrap();
    assert!(
        (a - 0.008).abs() < 1e-12 && (b - 0.001).abs() < 1e-12,
        "{a} {b}"
    );
    assert_eq!(fit.estimate(8).unwrap().as_micros(), 16_000);
}

/// The measured costs come out per network, shape and rows, averaged as recorded
/// (0.7 · old + 0.3 · new), the UNet's before the decoder's and fewer rows first.
#[test]
fn measured_costs_list_every_recorded_batch_in_order() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let decode = BatchKind {
        network: SharedNetwork::Decode,
        text: Vec::new(),
        sample: vec![4, 64, 64],
        ..kind()
    };
    {
        let mut s = batcher.lock();
        let unet = s.costs.entry(kind().cost_key()).or_default();
        unet.record(8, 0.040);
        unet.record(1, 0.010);
        unet.record(1, 0.020);
        s.costs.entry(decode).or_default().record(8, 0.016);
    }
    let listed: Vec<(SharedNetwork, Vec<usize>, usize, u64)> = batcher
        .measured_costs()
        .into_iter()
        .map(|c| {
            let micros = (c.time.as_secs_f64() * 1e6).round() as u64;
            (c.network, c.sample, c.rows, micros)
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (SharedNetwork::UNet, vec![4, 8, 8], 1, 13_000),
            (SharedNetwork::UNet, vec![4, 8, 8], 8, 40_000),
            (SharedNetwork::Decode, vec![4, 64, 64], 8, 16_000),
        ]
    );
}

fn kind() -> BatchKind {
    BatchKind {
        network: SharedNetwork::UNet,
        net: None,
        sample: vec![4, 8, 8],
        text: vec![77, 32],
        added: None,
        control: None,
        dtype: DType::F32,
        policy: KernelPolicy::current(),
    }
}

/// A cost measured with shared batches: `one` seconds for a call of 1 row, `two` for 2.
fn shared_fit(one: f64, two: f64) -> CostFit {
    let mut fit = CostFit {
        shared: true,
        ..CostFit::default()
    };
    fit.record(1, one);
    fit.record(2, two);
    fit
}

/// The tiny checkpoint's networks, loaded once: what a queued call carries (the hold
/// tests never run one).
fn test_models() -> Arc<StableDiffusionModels> {
    static MODELS: OnceLock<Arc<StableDiffusionModels>> = OnceLock::new();
    MODELS
        .get_or_init(|| {
            let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
            let settings = crate::EngineSettings::from_json(
                &serde_json::json!({
                    "vae": format!("{fixtures}/tiny-taesd"),
                    "allow_any_resolution": true,
                })
                .to_string(),
            )
            .unwrap();
            let id = format!("{fixtures}/tiny-sd-turbo");
            Arc::new(StableDiffusionModels::load(&id, &settings, &mut |_| {}).unwrap())
        })
        .clone()
}

/// Member 0's call of one row of `kind`, waiting in the queue since `arrived`, due at
/// `deadline`.
fn waiting(kind: BatchKind, arrived: Instant, deadline: Instant) -> Pending {
    Pending {
        ticket: 0,
        member: 0,
        kind,
        rows: 1,
        deadline: Some(deadline),
        due: deadline,
        arrived,
        thread: std::thread::current().id(),
        call: SharedCall::Encode(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap()),
        models: test_models(),
        queued: None,
    }
}

/// A batcher's state where batching pays, with `fit` measured for `kind` and member 0's
/// call of one row of it waiting in the queue since `arrived`, due at `deadline`.
fn one_waiting(kind: BatchKind, fit: CostFit, arrived: Instant, deadline: Instant) -> BatchState {
    let mut s = BatchState {
        pays_override: Some(true),
        ..BatchState::default()
    };
    s.costs.insert(kind.clone(), fit);
    s.queue.push(waiting(kind, arrived, deadline));
    s.members.insert(0, Member::default());
    s
}

/// The id of a thread other than this one (the other streams').
fn another_thread() -> ThreadId {
    std::thread::spawn(|| std::thread::current().id())
        .join()
        .unwrap()
}

/// A batch whose earliest deadline is lost whatever it does still waits for a stream due
/// within half the fixed cost of a batch (on a device where batching pays), and only for
/// such a one: its call alone later would pay the fixed cost again.
#[test]
fn a_late_batch_waits_for_a_stream_due_within_half_its_fixed_cost() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let now = Instant::now();
    // 8 ms a batch and 1 ms a row, measured shared: half the fixed cost is 4 ms. Member 0's
    // call waits, due now: its deadline is lost.
    let mut s = one_waiting(kind(), shared_fit(0.009, 0.010), now, now);
    let other = another_thread();
    // A stream calling every 100 ms, the last `ago` ms ago.
    let calling = |ago: u64| Member {
        kind: Some(kind()),
        rows: 1,
        last_call: Some(now - Duration::from_millis(ago)),
        interval: Some(Duration::from_millis(100)),
        last_thread: Some(other),
        ..Member::default()
    };
    // Due in 5 ms: past the horizon, not waited for.
    s.members.insert(1, calling(95));
    assert_eq!(batcher.hold_until(&s, &kind(), now), None);
    // Due in 3 ms: waited for, until the horizon at most.
    s.members.insert(2, calling(97));
    assert_eq!(
        batcher.hold_until(&s, &kind(), now),
        Some((now + Duration::from_millis(4), false))
    );
    // Where batching does not pay (a CPU's costs), never.
    s.pays_override = Some(false);
    assert_eq!(batcher.hold_until(&s, &kind(), now), None);
}

/// The kind of a TAESD encode batch of one 512² frame a row.
fn encode_kind() -> BatchKind {
    BatchKind {
        network: SharedNetwork::Encode,
        text: Vec::new(),
        sample: vec![3, 512, 512],
        ..kind()
    }
}

/// An encode batch waits for the streams whose encode is due by their pace, for at most a
/// batch's fixed cost (what a second batch for them would cost again), and not for a
/// stream due later than that, one already queued, or one that skipped its frame.
#[test]
fn an_encode_batch_waits_for_the_streams_due_within_its_fixed_cost() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let now = Instant::now();
    // 1.3 ms a batch and 0.2 ms a row, measured shared.
    let mut s = one_waiting(
        encode_kind(),
        shared_fit(0.0015, 0.0017),
        now,
        now + Duration::from_millis(50),
    );
    let other = another_thread();
    // A stream at 30 ms a frame whose last encode was `ago` µs ago.
    let encoding = |ago: u64| Member {
        interval: Some(Duration::from_millis(30)),
        last_thread: Some(other),
        shared_calls: vec![(encode_kind(), now - Duration::from_micros(ago), 1)],
        ..Member::default()
    };
    // Due in 10 ms, well past the fixed cost: not waited for.
    s.members.insert(1, encoding(20_000));
    assert_eq!(batcher.hold_until(&s, &encode_kind(), now), None);
    // Due in 0.2 ms: waited for, a fixed cost from the first call's arrival at most, however
    // often the runner wakes meanwhile.
    let mut due = encoding(29_800);
    s.members.insert(2, due.clone());
    for woken in [0, 1000] {
        assert_eq!(
            batcher.hold_until(&s, &encode_kind(), now + Duration::from_micros(woken)),
            Some((now + Duration::from_micros(1300), false))
        );
    }
    let past = now + Duration::from_micros(1300);
    assert_eq!(batcher.hold_until(&s, &encode_kind(), past), None);
    // 2 ms late (within a quarter of its spacing): still waited for.
    s.members.insert(2, encoding(32_000));
    assert!(batcher.hold_until(&s, &encode_kind(), now).is_some());
    // 10 ms late: not coming this round.
    s.members.insert(2, encoding(40_000));
    assert_eq!(batcher.hold_until(&s, &encode_kind(), now), None);
    // Its frame skipped: next due a spacing from now.
    due.frame_skipped(now);
    s.members.insert(2, due);
    assert_eq!(batcher.hold_until(&s, &encode_kind(), now), None);
    // The deadline lost whatever the batch does: half the fixed cost at most, and only
    // where batching pays.
    s.members.insert(2, encoding(29_800));
    s.queue[0].deadline = Some(now);
    assert_eq!(
        batcher.hold_until(&s, &encode_kind(), now),
        Some((now + Duration::from_micros(650), false))
    );
    s.pays_override = Some(false);
    assert_eq!(batcher.hold_until(&s, &encode_kind(), now), None);
    // Measured only for one stream's calls: no hold (the first shared batches come from
    // calls that meet by themselves).
    s.pays_override = Some(true);
    s.costs.get_mut(&encode_kind()).unwrap().shared = false;
    assert_eq!(batcher.hold_until(&s, &encode_kind(), now), None);
}

/// A decode batch whose deadline is lost still waits for the streams of the shared UNet
/// batch it came from, for half its fixed cost at most, where batching pays; before, it
/// ran without them (D(1) + D(7)).
#[test]
fn a_late_decode_batch_waits_half_its_fixed_cost_for_its_round() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let now = Instant::now();
    let decode = BatchKind {
        network: SharedNetwork::Decode,
        text: Vec::new(),
        sample: vec![4, 64, 64],
        ..kind()
    };
    // 1.6 ms a batch and 0.3 ms a row.
    let mut s = one_waiting(
        decode.clone(),
        shared_fit(0.0019, 0.0022),
        now,
        now + Duration::from_millis(50),
    );
    let behind = Member {
        decode_due: true,
        last_thread: Some(another_thread()),
        ..Member::default()
    };
    s.members.insert(1, behind);
    // In time: one decode's time (1.9 ms).
    assert_eq!(
        batcher.hold_until(&s, &decode, now),
        Some((now + Duration::from_micros(1900), false))
    );
    // Late: half the fixed cost, from when the call came.
    s.queue[0].deadline = Some(now);
    assert_eq!(
        batcher.hold_until(&s, &decode, now),
        Some((now + Duration::from_micros(800), false))
    );
    let woken = now + Duration::from_micros(800);
    assert_eq!(batcher.hold_until(&s, &decode, woken), None);
    s.pays_override = Some(false);
    assert_eq!(batcher.hold_until(&s, &decode, now), None);
}

/// A stream whose frame the similar-image filter skipped is not waited for: its next call
/// is a spacing from the skip, not due now.
#[test]
fn a_batch_does_not_wait_for_a_stream_that_skipped_its_frame() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let now = Instant::now();
    let mut s = one_waiting(
        kind(),
        shared_fit(0.009, 0.010),
        now,
        now + Duration::from_millis(50),
    );
    let other = another_thread();
    // Calls every 100 ms, the last 95 ms ago: due in 5 ms, waited for (a quarter of its
    // spacing past that at most, well before the batch must start to meet its deadline).
    let mut due = Member {
        kind: Some(kind()),
        rows: 1,
        last_call: Some(now - Duration::from_millis(95)),
        interval: Some(Duration::from_millis(100)),
        last_thread: Some(other),
        decode_due: true,
        ..Member::default()
    };
    s.members.insert(1, due.clone());
    assert_eq!(
        batcher.hold_until(&s, &kind(), now),
        Some((now + Duration::from_millis(30), false))
    );
    // Its frame skipped just now: next due in 100 ms, after the batch must start: not waited
    // for.
    due.frame_skipped(now);
    assert_eq!(due.last_call, Some(now));
    assert!(!due.decode_due);
    s.members.insert(1, due);
    assert_eq!(batcher.hold_until(&s, &kind(), now), None);
}

/// Admission counts a round's encoder and decoder batches once: each stream's time in a
/// shared batch is the whole batch's, so the streams' other work, summed, would count it
/// once per stream (8 streams whose 30 ms of other work is 28 ms of shared autoencoder
/// batches would look like 240 ms a round instead of about 40).
#[test]
fn a_round_counts_its_shared_autoencoder_batches_once() {
    let now = Instant::now();
    let of = |network| BatchKind {
        network,
        sample: vec![3, 64, 64],
        ..kind()
    };
    let (encode, decode) = (of(SharedNetwork::Encode), of(SharedNetwork::Decode));
    // A fixed cost and one per row, as a GPU's: UNet 5 + 1 ms a row, encoder 4 + 0.5,
    // decoder 6 + 1.
    let fit = |a: f64, b: f64| shared_fit(a + b, a + 2.0 * b);
    let mut s = BatchState::default();
    s.costs.insert(kind(), fit(0.005, 0.001));
    let member = |calls: Vec<(BatchKind, Instant, usize)>| Member {
        kind: Some(kind()),
        rows: 1,
        other_work: Some(Duration::from_millis(30)),
        autoencoder_work: Some(Duration::from_millis(28)),
        shared_calls: calls,
        ..Member::default()
    };
    let members: Vec<Member> = (0..8)
        .map(|_| member(vec![(encode.clone(), now, 1), (decode.clone(), now, 1)]))
        .collect();
    let peers: Vec<&Member> = members.iter().collect();
    let ms = |d: Duration| (d.as_secs_f64() * 1e3 * 1e3).round() / 1e3;
    // The autoencoder's costs not measured yet: each stream's other work as it is.
    let group = GroupRound::of(&s, &peers, false);
    assert_eq!(group.autoencoder, None);
    assert_eq!(ms(group.other), 240.0);
    assert_eq!(ms(group.round().unwrap()), 13.0 + 240.0);
    // Measured: one encoder batch of 8 rows (8 ms) and one decoder batch (14 ms), and each
    // stream's 2 ms of other work.
    s.costs.insert(encode.cost_key(), fit(0.004, 0.0005));
    s.costs.insert(decode.cost_key(), fit(0.006, 0.001));
    let group = GroupRound::of(&s, &peers, false);
    assert_eq!(group.autoencoder.map(ms), Some(22.0));
    assert_eq!(ms(group.other), 16.0);
    assert_eq!(ms(group.round().unwrap()), 13.0 + 22.0 + 16.0);
    // A ninth stream joining: one row more in each batch, and the mean other work.
    let joining = GroupRound::of(&s, &peers, true);
    assert_eq!(joining.autoencoder.map(ms), Some(8.5 + 15.0));
    assert_eq!(ms(joining.other), 18.0);
    assert_eq!(ms(joining.round().unwrap()), 14.0 + 23.5 + 18.0);
    // One cost missing (a stream that never decoded through the batcher): not predicted.
    s.costs.remove(&decode.cost_key());
    assert_eq!(GroupRound::of(&s, &peers, false).autoencoder, None);
}

/// A ControlNet batch waits for a stream that calls the same net at its pace, and not for
/// one that calls another net, nor for one whose UNet calls alone are due.
#[test]
fn a_controlnet_batch_holds_for_streams_of_the_same_net() {
    let batcher = CrossStreamBatcher::new(&Device::Cpu);
    let net = |id: usize| BatchKind {
        network: SharedNetwork::ControlNet,
        net: Some(id),
        control: Some(vec![vec![8, 8, 8]]),
        ..kind()
    };
    let now = Instant::now();
    let mut s = BatchState::default();
    // Measured with a shared batch: 10 ms a call and 1 ms a row.
    let fit = shared_fit(0.011, 0.012);
    s.costs.insert(net(1).cost_key(), fit);
    // Member 0 waits with its call of net 1, due in a second.
    s.queue
        .push(waiting(net(1), now, now + Duration::from_secs(1)));
    s.members.insert(0, Member::default());
    // The others call every 100 ms from another thread, the last time 90 ms ago.
    let other = another_thread();
    let last = now - Duration::from_millis(90);
    let member = |shared_calls| Member {
        interval: Some(Duration::from_millis(100)),
        last_thread: Some(other),
        shared_calls,
        ..Member::default()
    };
    s.members.insert(1, member(vec![(net(2), last, 1)]));
    s.members.insert(
        2,
        Member {
            kind: Some(kind()),
            last_call: Some(last),
            rows: 1,
            ..member(Vec::new())
        },
    );
    assert_eq!(batcher.hold_until(&s, &net(1), now), None);
    // One that called net 1 is due in 10 ms: held for it, a quarter of its spacing past.
    s.members.insert(3, member(vec![(net(1), last, 2)]));
    let (until, exploring) = batcher.hold_until(&s, &net(1), now).expect("a hold");
    assert!(!exploring);
    assert_eq!(until, last + Duration::from_millis(100 + 25));
}

#[test]
fn batching_pays_where_a_batch_has_a_fixed_cost() {
    let mut s = BatchState::default();
    // Nothing measured, or one stream's calls only: on a CPU assumed not to pay, while the
    // batcher explores.
    assert!(CrossStreamBatcher::exploring(&s, &kind(), false));
    assert!(!CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    let mut fit = CostFit::default();
    fit.record(2, 0.010);
    fit.record(4, 0.020);
    s.costs.insert(kind(), fit.clone());
    assert!(CrossStreamBatcher::exploring(&s, &kind(), false));
    assert!(!CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    // No shared batch measured after every hold tried: on a CPU, judged not to pay.
    let mut given_up = fit.clone();
    given_up.exploring_holds = EXPLORING_HOLDS;
    s.costs.insert(kind(), given_up);
    assert!(!CrossStreamBatcher::exploring(&s, &kind(), false));
    assert!(!CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    // Measured with a shared batch: cost proportional to the rows (a CPU): does not pay.
    fit.shared = true;
    s.costs.insert(kind(), fit.clone());
    assert!(!CrossStreamBatcher::exploring(&s, &kind(), false));
    // Where it may measure again (a GPU judged not to pay), only after REMEASURE_AFTER
    // batches since the last shared one; never where it may not (a CPU).
    assert!(!CrossStreamBatcher::exploring(&s, &kind(), true));
    let mut stale = fit.clone();
    stale.batches_since_shared = REMEASURE_AFTER - 1;
    s.costs.insert(kind(), stale.clone());
    assert!(!CrossStreamBatcher::exploring(&s, &kind(), true));
    stale.batches_since_shared = REMEASURE_AFTER;
    s.costs.insert(kind(), stale);
    assert!(CrossStreamBatcher::exploring(&s, &kind(), true));
    assert!(!CrossStreamBatcher::exploring(&s, &kind(), false));
    s.costs.insert(kind(), fit);
    assert!(!CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    // A fixed 8 ms a call and 1 ms a row (a GPU's launches): pays.
    let mut gpu = CostFit {
        shared: true,
        ..CostFit::default()
    };
    gpu.record(2, 0.010);
    gpu.record(4, 0.012);
    s.costs.insert(kind(), gpu);
    assert!(CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    // A control residual does not change the kind costs are kept under.
    let with_control = BatchKind {
        control: Some(vec![vec![4, 8, 8]]),
        ..kind()
    };
    assert!(with_control.joins(&kind()) && with_control.cost_key() == kind());
    // A test's lockstep batches whatever the costs.
    s.lockstep_for_tests = Some(2);
    assert!(CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
    s.pays_override = Some(false);
    assert!(!CrossStreamBatcher::batching_pays(
        &s,
        &kind(),
        2,
        &Device::Cpu
    ));
}
