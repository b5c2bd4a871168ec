//! The builder thread: builds pipelines (first load, reloads, restarts), preloads ControlNets
//! for swaps, and frees retired pipelines off the worker's path.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::params::StreamDiffusionParams;
use crate::{Error, Result};

use super::pipeline::warmup_passes;
use super::state::{BuildKind, BuildTicket, Ready, Shared, panic_message};

pub(super) fn run_builder(shared: &Shared) {
    loop {
        let (ticket, retired) = {
            let mut s = shared.lock();
            loop {
                if !s.retired.is_empty() {
                    break (None, std::mem::take(&mut s.retired));
                }
                if s.closed {
                    return;
                }
                if let Some(ticket) = s.build_request.take() {
                    s.progress = Some("building".into());
                    break (Some(ticket), Vec::new());
                }
                s = shared.wait(&shared.build, s);
            }
        };
        for pipeline in retired {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(pipeline)));
        }
        if let Some(ticket) = ticket {
            match ticket.kind {
                BuildKind::Pipeline => {
                    let outcome = build(shared, &ticket);
                    finish_build(shared, ticket, outcome);
                }
                BuildKind::Preload => {
                    let outcome = preload(shared, &ticket);
                    finish_preload(shared, ticket, outcome);
                }
            }
        }
    }
}

/// Builds the ticket's pipeline and, with warm-up on, primes it with the latest frame so it
/// comes in without zero-buffer outputs.
pub(super) fn build(shared: &Shared, ticket: &BuildTicket) -> Result<Ready> {
    let version = ticket.version;
    let mut progress = |line: &str| {
        let mut s = shared.lock();
        if s.is_wanted(version) {
            s.progress = Some(line.to_owned());
        }
    };
    let built = catch_unwind(AssertUnwindSafe(|| {
        shared.factory.build(&ticket.params, &mut progress)
    }));
    let mut pipeline = match built {
        Ok(result) => result?,
        Err(panic) => {
            return Err(Error::State(format!(
                "building the pipeline panicked: {}",
                panic_message(panic.as_ref())
            )));
        }
    };
    let mut warmed = false;
    if shared.options.warmup {
        let frame = {
            let s = shared.lock();
            s.is_wanted(version).then(|| s.last_frame.clone()).flatten()
        };
        if let Some(job) = frame {
            progress("warming up with the latest frame");
            let passes = warmup_passes(pipeline.params());
            let primed = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
                for _ in 0..passes {
                    job.process(pipeline.as_mut(), None)?;
                }
                Ok(())
            }));
            match primed {
                Ok(Ok(())) => warmed = true,
                Ok(Err(e)) => {
                    return Err(Error::State(format!(
                        "the new pipeline failed its warm-up: {e}"
                    )));
                }
                Err(panic) => {
                    return Err(Error::State(format!(
                        "the new pipeline panicked during its warm-up: {}",
                        panic_message(panic.as_ref())
                    )));
                }
            }
        }
    }
    Ok(Ready {
        version,
        pipeline,
        warmed,
    })
}

/// Loads the networks the ticket's parameters add into the shared caches.
pub(super) fn preload(shared: &Shared, ticket: &BuildTicket) -> Result<()> {
    let version = ticket.version;
    let mut progress = |line: &str| {
        let mut s = shared.lock();
        if s.is_wanted(version) {
            s.progress = Some(line.to_owned());
        }
    };
    catch_unwind(AssertUnwindSafe(|| {
        shared
            .factory
            .preload_networks(&ticket.params, &mut progress)
    }))
    .unwrap_or_else(|panic| {
        Err(Error::State(format!(
            "loading networks panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

/// Hands a finished preload to the worker, which attaches the nets between two frames; a
/// failed one leaves the serving parameters in force.
pub(super) fn finish_preload(shared: &Shared, ticket: BuildTicket, outcome: Result<()>) {
    let mut s = shared.lock();
    if s.closed || !s.is_wanted(ticket.version) {
        if !s.closed {
            s.builds_superseded += 1;
        }
        return;
    }
    s.pending_build = None;
    s.progress = None;
    match outcome {
        Ok(()) => s.preloads_done += 1,
        Err(e) => {
            s.reload_failures += 1;
            s.record_error(format!(
                "loading the ControlNets of parameters version {} failed, the stream keeps its \
                 previous ControlNets: {e}",
                ticket.version
            ));
            s.revert_target_to_serving();
        }
    }
    drop(s);
    shared.work.notify_one();
    shared.host.notify_all();
}

/// Whether two parameter sets need the same networks: the same ControlNets (in any order) and
/// the same processor networks, so that one preload serves both.
pub(super) fn same_networks(a: &StreamDiffusionParams, b: &StreamDiffusionParams) -> bool {
    fn ids(p: &StreamDiffusionParams) -> Vec<&str> {
        let mut v: Vec<&str> = p.controlnets.iter().map(|c| c.model_id.as_str()).collect();
        v.sort_unstable();
        v
    }
    let networks = |p| {
        let mut v = crate::preprocess::networks_for(p);
        v.sort_unstable_by_key(|r| (r.repo, r.stem));
        v
    };
    ids(a) == ids(b)
        && networks(a) == networks(b)
        && a.use_safety_checker == b.use_safety_checker
        && a.ip_adapter == b.ip_adapter
        && a.ip_adapter_style_image_url == b.ip_adapter_style_image_url
}

pub(super) fn finish_build(shared: &Shared, ticket: BuildTicket, outcome: Result<Ready>) {
    let mut s = shared.lock();
    if s.closed || !s.is_wanted(ticket.version) {
        if !s.closed {
            s.builds_superseded += 1;
        }
        drop(s);
        if let Ok(ready) = outcome {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(ready.pipeline)));
        }
        return;
    }
    match outcome {
        Ok(ready) => {
            s.progress = Some("ready; swapping in".into());
            s.ready = Some(ready);
            drop(s);
            shared.work.notify_one();
        }
        Err(e) => {
            s.pending_build = None;
            s.progress = None;
            let what = format!(
                "building the pipeline for model `{}` (parameters version {}) failed",
                ticket.params.model_id, ticket.version
            );
            if s.serving.is_some() {
                s.reload_failures += 1;
                s.record_error(format!("{what}, the previous pipeline keeps serving: {e}"));
                s.revert_target_to_serving();
            } else {
                s.record_error(format!("{what}: {e}"));
                s.initial_error = Some(e);
            }
            drop(s);
            shared.work.notify_one();
            shared.host.notify_all();
        }
    }
}
