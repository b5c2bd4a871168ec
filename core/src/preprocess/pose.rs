//! `openpose` and `pose_tensorrt`: body keypoints drawn as the OpenPose skeleton image pose
//! ControlNets were trained on, with the OpenPose body network ([`crate::model::openpose_body`],
//! `body_pose_model.pth` of `lllyasviel/Annotators`), as Daydream's `OpenPosePreprocessor`
//! computes it through controlnet_aux 0.0.10's `OpenposeDetector`:
//! 1. the frame's 8-bit levels squashed to `detect_resolution`² with PIL's Lanczos (Daydream's
//!    wrapper), then `resize_image(image, 512)` (controlnet_aux's default detect resolution,
//!    which Daydream does not pass on);
//! 2. in `Body.__call__`, with the image in BGR: scaled by 0.5·368/H with OpenCV (area when
//!    shrinking, sides truncated to integers), padded on the bottom and right with 128 to
//!    multiples of 8, the network on `pixel / 256 − 0.5`;
//! 3. every heatmap and part-affinity channel enlarged ×8 with OpenCV's Lanczos-4 (f32), the
//!    padding cut off, resized to the image (Lanczos-4 when enlarging, area otherwise);
//! 4. the keypoints decoded and grouped into people ([`super::openpose`]);
//! 5. with `include_hands` or `include_face` (Daydream passes controlnet_aux
//!    `hand_and_face = include_hands or include_face`, so either switches on both), each
//!    person's hands and face found with OpenPose's hand and face networks
//!    ([`super::hand_face`]);
//! 6. per person, the limbs (ellipses at 0.6 of their colour) and joints, then the hands and
//!    the face, drawn on a black canvas with OpenCV's rasterisation ([`super::cv_draw`]);
//! 7. Daydream's tensor path resizes the canvas to the frame's size (bilinear).
//!
//! Daydream's `pose_tensorrt` runs a different network (YOLO-NAS-Pose through TensorRT) and
//! draws its own skeleton; sdstream runs OpenPose for it too, which gives the skeleton the
//! OpenPose ControlNets (`thibaud/controlnet-sd21-openpose-diffusers`, …) were trained on.
//!
//! Params: `detect_resolution` (integer, default 512); `openpose`: `include_hands` and
//! `include_face` (booleans, default false; either loads `hand_pose_model.pth` and
//! `facenet.pth` and draws hands and face); `pose_tensorrt`: `confidence_threshold` (number in [0, 1], default 0.5)
//! and `engine_path` select Daydream's TensorRT engine: accepted, unused; `image_resolution`:
//! accepted (the output has the frame's size).

use candle_core::{DType, Device, Tensor};

use super::annotator::{Rgb8, to_stream_size};
use super::cv_draw::{ellipse_to_polygon, fill_circle, fill_convex_polygon};
use super::cv_resize::resize_f32;
use super::hand_face::{self, smart_mode};
use super::networks::NetworkRequest;
use super::openpose::{
    HEATMAP_CHANNELS, PAF_CHANNELS, Person, Stroke, body_strokes, decode_people,
};
use super::param_reader::ParamReader;
use crate::model::openpose_body::BodyPoseNet;
use crate::model::openpose_cpm::KeypointNet;
use crate::{Error, Result};

/// controlnet_aux's default detect resolution, which Daydream does not change.
const DETECT_RESOLUTION: usize = 512;
/// `Body.__call__`'s box size: the image is scaled so its height is half of it.
const BOX_SIZE: f64 = 368.0;
/// The network's output stride.
const STRIDE: usize = 8;

/// `openpose` / `pose_tensorrt` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoseParams {
    /// The square side the frame is squashed to first.
    pub detect_resolution: usize,
    /// Hands and face as well (`include_hands` or `include_face`).
    pub hands_and_face: bool,
}

impl PoseParams {
    /// Reads `openpose`'s params, or `pose_tensorrt`'s when `tensorrt_names` is set.
    pub fn read(r: &ParamReader<'_>, tensorrt_names: bool) -> Result<Self> {
        let hands_and_face = if tensorrt_names {
            r.number("confidence_threshold", 0.5, 0.0..=1.0)?;
            r.string("engine_path")?;
            false
        } else {
            r.boolean("include_hands", false)? | r.boolean("include_face", false)?
        };
        r.integer("image_resolution", 512, 64..=4096)?;
        Ok(Self {
            detect_resolution: r.integer("detect_resolution", 512, 64..=4096)? as usize,
            hands_and_face,
        })
    }

    /// The networks these settings run: the body's, and the hand's and face's with
    /// [`Self::hands_and_face`].
    pub fn networks(&self) -> Vec<NetworkRequest> {
        let mut requests = vec![NetworkRequest::BODY_POSE];
        if self.hands_and_face {
            requests.extend([NetworkRequest::HAND_POSE, NetworkRequest::FACE_POSE]);
        }
        requests
    }
}

/// The hand and face networks, as functions from a prepared input to its heatmaps (so that the
/// steps around them can be checked with given maps).
pub struct HandFaceNetworks<'a> {
    /// Input `[1, 3, H, W]` to heatmaps `[1, 22, H/8, W/8]`.
    pub hand: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    /// Input `[1, 3, 384, 384]` to heatmaps `[1, 71, 48, 48]`.
    pub face: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

/// The pose skeleton of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1];
/// `hand_face` (the hand's and the face's networks) draws hands and faces too.
pub fn apply(
    net: &BodyPoseNet,
    hand_face: Option<(&KeypointNet, &KeypointNet)>,
    image: &Tensor,
    p: PoseParams,
) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let d = p.detect_resolution;
    let detect = Rgb8::from_tensor(image)?
        .resize_pil_lanczos(d, d)
        .resize_image(DETECT_RESOLUTION);
    let device = image.device();
    let hand =
        |x: &Tensor| hand_face.map_or_else(|| unreachable_net("hand"), |(n, _)| n.forward(x));
    let face =
        |x: &Tensor| hand_face.map_or_else(|| unreachable_net("face"), |(_, n)| n.forward(x));
    let extras = HandFaceNetworks {
        hand: &hand,
        face: &face,
    };
    let canvas = skeleton(
        &detect,
        device,
        |x| {
            let (pafs, heatmaps) = net.forward(x)?;
            Ok((pafs.to_dtype(DType::F32)?, heatmaps.to_dtype(DType::F32)?))
        },
        hand_face.is_some().then_some(&extras),
    )?;
    to_stream_size(&canvas.to_tensor(device)?, h, w)
}

fn unreachable_net(what: &str) -> Result<Tensor> {
    Err(Error::State(format!(
        "no OpenPose {what} network was loaded"
    )))
}

/// Steps 2–6 on `image` (RGB): the skeleton canvas at the image's size. `network` maps the
/// prepared input `[1, 3, h, w]` (BGR, `pixel / 256 − 0.5`, f32) to the PAFs `[1, 38, h/8, w/8]`
/// and heatmaps `[1, 19, h/8, w/8]` (f32); it is a parameter so that the steps around it can be
/// checked with given maps. With `hand_face`, hands and faces are found and drawn too.
pub fn skeleton(
    image: &Rgb8,
    device: &Device,
    network: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor)>,
    hand_face: Option<&HandFaceNetworks<'_>>,
) -> Result<Rgb8> {
    let (h, w) = (image.height, image.width);
    let people = find_people(image, device, network)?;
    let mut canvas = vec![0u8; h * w * 3];
    for person in &people {
        draw_body(&mut canvas, h, w, std::slice::from_ref(person));
        if let Some(nets) = hand_face {
            let found = hand_face::detect(person, image, device, nets.hand, nets.face)?;
            for hand in [&found.left_hand, &found.right_hand].into_iter().flatten() {
                hand_face::draw_hand(&mut canvas, h, w, hand);
            }
            if let Some(face) = &found.face {
                hand_face::draw_face(&mut canvas, h, w, face);
            }
        }
    }
    Ok(Rgb8 {
        height: h,
        width: w,
        data: canvas,
    })
}

/// Steps 2–4 on `image` (RGB): the people the body network's maps give (`network` as in
/// [`skeleton`]).
pub fn find_people(
    image: &Rgb8,
    device: &Device,
    network: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<Vec<Person>> {
    let (h, w) = (image.height, image.width);
    let input = network_input(image, device)?;
    let (_, _, ph, pw) = input.dims4()?;
    let (small_h, small_w) = scaled_size(h, w);
    let (pafs, heatmaps) = network(&input)?;
    let maps = |t: &Tensor, channels: usize, what: &str| -> Result<Vec<f64>> {
        let dims = t.dims();
        if dims.len() != 4
            || dims[1] != channels
            || dims[2] * STRIDE != ph
            || dims[3] * STRIDE != pw
        {
            return Err(Error::State(format!(
                "the OpenPose body network gave {what} of shape {dims:?}; expected [1, \
                 {channels}, {}, {}]",
                ph / STRIDE,
                pw / STRIDE
            )));
        }
        resized_maps(t, small_h, small_w, h, w)
    };
    let heat = maps(&heatmaps, HEATMAP_CHANNELS, "heatmaps")?;
    let paf = maps(&pafs, PAF_CHANNELS, "part affinity fields")?;
    Ok(decode_people(&heat, &paf, h, w))
}

/// `draw_bodypose` for `people` on an RGB canvas.
fn draw_body(canvas: &mut [u8], h: usize, w: usize, people: &[Person]) {
    for stroke in body_strokes(people, w, h) {
        match stroke {
            Stroke::Limb {
                center,
                axes,
                angle,
                color,
            } => {
                let polygon = ellipse_to_polygon(
                    (center[0], center[1]),
                    (axes[0], axes[1]),
                    angle,
                    0,
                    360,
                    1,
                );
                fill_convex_polygon(canvas, h, w, &polygon, color);
            }
            Stroke::Joint {
                center,
                radius,
                color,
            } => fill_circle(canvas, h, w, (center[0], center[1]), radius, color),
        }
    }
}

/// `smart_resize_k`'s size for the network: each side times 0.5·368/H, truncated.
fn scaled_size(h: usize, w: usize) -> (usize, usize) {
    let scale = 0.5 * BOX_SIZE / h as f64;
    ((h as f64 * scale) as usize, (w as f64 * scale) as usize)
}

/// Step 2's network input `[1, 3, h, w]`: the image in BGR scaled to [`scaled_size`], padded
/// with 128 to multiples of 8 on the bottom and right, as `pixel / 256 − 0.5` in f32.
pub fn network_input(image: &Rgb8, device: &Device) -> Result<Tensor> {
    let (h, w) = (image.height, image.width);
    let (sh, sw) = scaled_size(h, w);
    if sh == 0 || sw == 0 {
        return Err(Error::InvalidFrame(format!(
            "openpose: a {w}x{h} image scales to nothing"
        )));
    }
    let small = image.resize_cv(sh, sw, smart_mode((h, w), (sh, sw)));
    hand_face::bgr_input(&small, device)
}

/// Step 3 for one network output `[1, C, h, w]`: each channel ×8 with Lanczos-4, cut to the
/// unpadded `small_h × small_w`, resized to `h × w`; planar f64 (the f32 values widened).
fn resized_maps(
    maps: &Tensor,
    small_h: usize,
    small_w: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f64>> {
    let (_, channels, mh, mw) = maps.dims4()?;
    let values = maps.flatten_all()?.to_vec1::<f32>()?;
    let (uh, uw) = (mh * STRIDE, mw * STRIDE);
    let mut out = Vec::with_capacity(channels * h * w);
    let mut cut = vec![0f32; small_h * small_w];
    for plane in values.chunks_exact(mh * mw) {
        let up = resize_f32(plane, mh, mw, 1, uh, uw, smart_mode((mh, mw), (uh, uw)));
        for (y, row) in cut.chunks_exact_mut(small_w).enumerate() {
            row.copy_from_slice(&up[y * uw..y * uw + small_w]);
        }
        let full = resize_f32(
            &cut,
            small_h,
            small_w,
            1,
            h,
            w,
            smart_mode((small_h, small_w), (h, w)),
        );
        out.extend(full.into_iter().map(f64::from));
    }
    Ok(out)
}
