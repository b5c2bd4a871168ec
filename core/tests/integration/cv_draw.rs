//! `cv_draw` against cv2 drawing goldens (tests/reference/make_cv_goldens.py): every case is
//! drawn on a fresh zeroed canvas and compared pixel for pixel (as runs of painted pixels).

use crate::common;

use std::path::PathBuf;

use sdstream::preprocess::cv_draw::{ellipse_to_polygon, fill_circle, fill_convex_polygon, line};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    common::fixture("preprocess/cv")
}

#[derive(Debug, Deserialize)]
struct EllipseCase {
    center: [i32; 2],
    axes: [i32; 2],
    angle: i32,
    arc: [i32; 2],
    delta: i32,
    runs: Vec<i64>,
    points: Option<[usize; 2]>,
}

#[derive(Debug, Deserialize)]
struct PolygonCase {
    points: Vec<i32>,
    runs: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct CircleCase {
    center: [i32; 2],
    radius: i32,
    runs: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct LineCase {
    p1: [i32; 2],
    p2: [i32; 2],
    thickness: i32,
    runs: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct Op {
    op: String,
    center: [i32; 2],
    axes: Option<[i32; 2]>,
    angle: Option<i32>,
    radius: Option<i32>,
    color: [u8; 3],
}

#[derive(Debug, Deserialize)]
struct Bodypose {
    ops: Vec<Op>,
    runs: Vec<i64>,
}

#[derive(Debug, Deserialize)]
struct Goldens {
    opencv: String,
    canvas: [usize; 2],
    color: [u8; 3],
    ellipses: Vec<EllipseCase>,
    polygons: Vec<PolygonCase>,
    circles: Vec<CircleCase>,
    lines: Vec<LineCase>,
    bodypose: Bodypose,
}

fn load() -> (Goldens, Vec<i16>) {
    let dir = fixtures();
    let goldens: Goldens =
        serde_json::from_slice(&std::fs::read(dir.join("draw.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("ellipse_polygons.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let points = st
        .tensor("points")
        .unwrap()
        .data()
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (goldens, points)
}

/// Expected single-colour canvas from runs `[y, x0, x1, ...]`.
fn mask_canvas(runs: &[i64], h: usize, w: usize, color: [u8; 3]) -> Vec<u8> {
    let mut canvas = vec![0u8; h * w * 3];
    for r in runs.chunks_exact(3) {
        for x in r[1]..=r[2] {
            let at = (r[0] as usize * w + x as usize) * 3;
            canvas[at..at + 3].copy_from_slice(&color);
        }
    }
    canvas
}

/// Expected canvas from colour runs `[y, x0, x1, c0, c1, c2, ...]`.
fn colour_canvas(runs: &[i64], h: usize, w: usize) -> Vec<u8> {
    let mut canvas = vec![0u8; h * w * 3];
    for r in runs.chunks_exact(6) {
        for x in r[1]..=r[2] {
            let at = (r[0] as usize * w + x as usize) * 3;
            canvas[at..at + 3].copy_from_slice(&[r[3] as u8, r[4] as u8, r[5] as u8]);
        }
    }
    canvas
}

fn differing_pixels(a: &[u8], b: &[u8]) -> usize {
    a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .filter(|(p, q)| p != q)
        .count()
}

/// Draws each case on a fresh canvas and counts the cases and pixels that differ from cv2.
fn check<T>(
    group: &str,
    cases: &[T],
    g: &Goldens,
    runs: impl Fn(&T) -> &[i64],
    draw: impl Fn(&T, &mut [u8]),
) {
    let [h, w] = g.canvas;
    let (mut bad_cases, mut bad_pixels, mut painted) = (0, 0, 0);
    for (i, case) in cases.iter().enumerate() {
        let mut canvas = vec![0u8; h * w * 3];
        draw(case, &mut canvas);
        let expected = mask_canvas(runs(case), h, w, g.color);
        painted += expected
            .chunks_exact(3)
            .filter(|p| p.iter().any(|&v| v != 0))
            .count();
        let d = differing_pixels(&canvas, &expected);
        if d > 0 {
            bad_cases += 1;
            bad_pixels += d;
            println!("{group} case {i}: {d} pixels differ");
        }
    }
    println!(
        "{group}: {} cases, {painted} painted pixels in cv2's canvases, {bad_cases} cases and {bad_pixels} pixels differ",
        cases.len()
    );
    assert_eq!(bad_pixels, 0, "{group}: {bad_cases} cases differ from cv2");
}

#[test]
fn ellipse_polygons_match_cv2() {
    let (g, points) = load();
    println!("goldens from OpenCV {}", g.opencv);
    let mut checked = 0;
    for (i, e) in g.ellipses.iter().enumerate() {
        let Some([offset, count]) = e.points else {
            continue;
        };
        let expected: Vec<(i32, i32)> = points[offset * 2..(offset + count) * 2]
            .chunks_exact(2)
            .map(|p| (p[0] as i32, p[1] as i32))
            .collect();
        let got = ellipse_to_polygon(
            (e.center[0], e.center[1]),
            (e.axes[0], e.axes[1]),
            e.angle,
            e.arc[0],
            e.arc[1],
            e.delta,
        );
        assert_eq!(got, expected, "ellipse case {i}: {e:?}");
        checked += 1;
    }
    println!("{checked} ellipse polygons identical to cv2.ellipse2Poly");
    assert!(checked >= 100);
}

#[test]
fn filled_ellipses_match_cv2() {
    let (g, _) = load();
    let [h, w] = g.canvas;
    check(
        "ellipses",
        &g.ellipses,
        &g,
        |c| &c.runs,
        |e, canvas| {
            let poly = ellipse_to_polygon(
                (e.center[0], e.center[1]),
                (e.axes[0], e.axes[1]),
                e.angle,
                e.arc[0],
                e.arc[1],
                e.delta,
            );
            fill_convex_polygon(canvas, h, w, &poly, g.color);
        },
    );
}

#[test]
fn filled_polygons_match_cv2() {
    let (g, _) = load();
    let [h, w] = g.canvas;
    check(
        "polygons",
        &g.polygons,
        &g,
        |c| &c.runs,
        |p, canvas| {
            let pts: Vec<(i32, i32)> = p.points.chunks_exact(2).map(|q| (q[0], q[1])).collect();
            fill_convex_polygon(canvas, h, w, &pts, g.color);
        },
    );
}

#[test]
fn filled_circles_match_cv2() {
    let (g, _) = load();
    let [h, w] = g.canvas;
    check(
        "circles",
        &g.circles,
        &g,
        |c| &c.runs,
        |c, canvas| {
            fill_circle(canvas, h, w, (c.center[0], c.center[1]), c.radius, g.color);
        },
    );
}

#[test]
fn lines_match_cv2() {
    let (g, _) = load();
    let [h, w] = g.canvas;
    check(
        "lines",
        &g.lines,
        &g,
        |c| &c.runs,
        |l, canvas| {
            line(
                canvas,
                h,
                w,
                (l.p1[0], l.p1[1]),
                (l.p2[0], l.p2[1]),
                g.color,
                l.thickness,
            );
        },
    );
    let thick = g.lines.iter().filter(|l| l.thickness > 1).count();
    println!("({thick} of them thicker than one pixel)");
}

/// controlnet_aux's `draw_bodypose` on three skeletons, replayed from its integer parameters.
#[test]
fn bodypose_composite_matches_controlnet_aux() {
    let (g, _) = load();
    let [h, w] = g.canvas;
    let mut canvas = vec![0u8; h * w * 3];
    for op in &g.bodypose.ops {
        let center = (op.center[0], op.center[1]);
        match op.op.as_str() {
            "limb" => {
                let axes = op.axes.unwrap();
                let poly =
                    ellipse_to_polygon(center, (axes[0], axes[1]), op.angle.unwrap(), 0, 360, 1);
                fill_convex_polygon(&mut canvas, h, w, &poly, op.color);
            }
            "joint" => fill_circle(&mut canvas, h, w, center, op.radius.unwrap(), op.color),
            other => panic!("unknown op {other}"),
        }
    }
    let expected = colour_canvas(&g.bodypose.runs, h, w);
    let painted = expected
        .chunks_exact(3)
        .filter(|p| p.iter().any(|&v| v != 0))
        .count();
    let d = differing_pixels(&canvas, &expected);
    println!(
        "bodypose: {} operations, {painted} painted pixels, {d} differ",
        g.bodypose.ops.len()
    );
    assert_eq!(d, 0);
}
