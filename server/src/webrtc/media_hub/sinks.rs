//! Encoded output for consumers outside WebRTC (HLS segments, an RTMP push): each
//! [`EncodedSink`] gets every picture the pump encodes, from its own bounded queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::super::TransportError;
use super::{MediaHub, Shared, lock};

/// One encoded output picture, shared by every viewer and sink.
#[derive(Debug)]
pub struct EncodedFrame {
    /// Position in the stream's encoded sequence (consecutive; a gap means this consumer
    /// missed pictures and must wait for a keyframe).
    pub seq: u64,
    /// Annex-B NAL units (start codes included); a keyframe carries SPS and PPS first.
    pub data: Bytes,
    /// An IDR picture: a decoder can start here.
    pub keyframe: bool,
    /// Width and height in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Time since the previous output (at least 1 ms): the picture's display duration.
    pub duration: Duration,
    /// When the publisher's access unit was complete (the frame's timestamp).
    pub arrived: Instant,
    /// When the pump took the output from the engine.
    pub taken: Instant,
    /// When the encode finished.
    pub encoded: Instant,
    /// The pipeline call's own time.
    pub pipeline: Duration,
}

/// Queued pictures per sink; a sink further behind loses pictures and waits for a keyframe.
const SINK_QUEUE: usize = 16;

static NEXT_SINK: AtomicU64 = AtomicU64::new(1);

/// A subscription to a stream's encoded output (see [`MediaHub::subscribe_encoded`]).
/// Dropping it unsubscribes; while any sink or viewer exists the stream encodes its outputs.
pub struct EncodedSink {
    shared: Arc<Shared>,
    id: u64,
    frames: mpsc::Receiver<Arc<EncodedFrame>>,
    last_seq: Option<u64>,
    waiting_for_keyframe: bool,
}

impl std::fmt::Debug for EncodedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedSink")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EncodedSink {
    /// The next picture a decoder can use: the first is a keyframe, and after a gap (pictures
    /// this sink had no room for) pictures are skipped up to the next keyframe, which is
    /// asked for. `None` once the stream is closed.
    pub async fn recv(&mut self) -> Option<Arc<EncodedFrame>> {
        loop {
            let frame = self.frames.recv().await?;
            if let Some(frame) = self.accept(frame) {
                return Some(frame);
            }
        }
    }

    /// [`recv`](Self::recv) that gives up after `timeout` (`Ok(None)`); `Err(())` once the
    /// stream is closed.
    pub async fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Arc<EncodedFrame>>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(()),
                Ok(Some(frame)) => {
                    if let Some(frame) = self.accept(frame) {
                        return Ok(Some(frame));
                    }
                }
            }
        }
    }

    fn accept(&mut self, frame: Arc<EncodedFrame>) -> Option<Arc<EncodedFrame>> {
        if self.last_seq.is_some_and(|last| frame.seq != last + 1) {
            self.waiting_for_keyframe = true;
        }
        self.last_seq = Some(frame.seq);
        if self.waiting_for_keyframe {
            if !frame.keyframe {
                self.request_keyframe();
                return None;
            }
            self.waiting_for_keyframe = false;
        }
        Some(frame)
    }

    /// Makes the stream's next encoded picture a keyframe (an HLS segment boundary).
    pub fn request_keyframe(&self) {
        self.shared
            .keyframe_wanted
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for EncodedSink {
    fn drop(&mut self) {
        lock(&self.shared.sinks).remove(&self.id);
    }
}

impl MediaHub {
    /// Subscribes to the stream's encoded output: every engine output from now on, encoded
    /// once for all viewers and sinks (H.264 constrained baseline, the encoder settings of
    /// the transport). The first picture handed out is a keyframe.
    pub fn subscribe_encoded(&self) -> Result<EncodedSink, TransportError> {
        self.check_open()?;
        let (tx, frames) = mpsc::channel(SINK_QUEUE);
        let id = NEXT_SINK.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.sinks).insert(id, tx);
        self.shared.keyframe_wanted.store(true, Ordering::Release);
        Ok(EncodedSink {
            shared: self.shared.clone(),
            id,
            frames,
            last_seq: None,
            waiting_for_keyframe: true,
        })
    }
}
