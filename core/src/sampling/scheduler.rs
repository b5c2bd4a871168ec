//! The LCM timestep grid and the per-step coefficients of the stream batch (docs/ALGORITHM.md §1).
//!
//! The arithmetic mirrors the reference's dtypes so that the coefficients are bit-identical:
//! betas come from torch's float32 `linspace` (squared for `scaled_linear`), ᾱ is their float32
//! cumulative product accumulated in float64 (torch's CPU `cumprod` accumulates in double), and
//! √ᾱ, √(1 − ᾱ), c_skip and c_out are float32 tensor arithmetic, as StreamDiffusion's `prepare`
//! computes them.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The length S of the LCM origin schedule that the engine takes its grid from.
///
/// Daydream uses 100 so that `num_inference_steps` may go up to 100; at N = 50 the grid equals the
/// reference's (S = 50): T[i] = 999 − 20·i.
pub const ORIGINAL_INFERENCE_STEPS: usize = 100;

/// Bound on `num_train_timesteps`, which sizes the beta tables: Stable Diffusion trains with
/// 1000, so this leaves room for any real schedule while an absurd value cannot make the
/// tables unallocatable.
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The LCM boundary-condition σ_data.
const SIGMA_DATA: f32 = 0.5;

/// How the training betas are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β_j = linspace(√β_start, √β_end)_j², Stable Diffusion's schedule.
    ScaledLinear,
    /// β_j = linspace(β_start, β_end)_j.
    Linear,
    /// The cosine schedule (Nichol & Dhariwal), β capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// The scheduler fields of a checkpoint's `scheduler/scheduler_config.json` that shape the grid.
///
/// The file may belong to any diffusers scheduler class (sd-turbo ships an Euler config); like the
/// reference, which re-reads it as an `LCMScheduler`, only these keys matter, and missing keys take
/// LCMScheduler's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Number of training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.00085).
    pub beta_start: f64,
    /// Last beta (0.012).
    pub beta_end: f64,
    /// Layout of the betas (`scaled_linear`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule when present.
    pub trained_betas: Option<Vec<f64>>,
    /// Multiplier of the timestep in c_skip / c_out (10).
    pub timestep_scaling: f64,
    /// Zero-terminal-SNR rescaling; not supported (a config that sets it is rejected).
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`; unknown keys are ignored, missing keys take defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = crate::model::read_config(path)?;
        config.validate().map_err(|detail| Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            return Err(format!(
                "num_train_timesteps {} is above the limit of {MAX_TRAIN_TIMESTEPS}",
                self.num_train_timesteps
            ));
        }
        if self.num_train_timesteps < 2 {
            return Err(format!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            ));
        }
        if self.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr = true is not supported".into());
        }
        if let Some(betas) = &self.trained_betas
            && betas.len() != self.num_train_timesteps
        {
            return Err(format!(
                "trained_betas has {} values but num_train_timesteps is {}",
                betas.len(),
                self.num_train_timesteps
            ));
        }
        Ok(())
    }

    /// The float32 betas, computed as diffusers/torch compute them.
    fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        if let Some(betas) = &self.trained_betas {
            return betas.iter().map(|&b| b as f32).collect();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: float32 endpoints and step, the first
/// half counted up from `start`, the second half down from `end`, each value one fused
/// multiply-add (bit-identical to torch on x86).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            // torch's x86 build contracts these into fused multiply-adds.
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The LCM scheduler's fixed tables: ᾱ per training timestep, and the grid and coefficients
/// derived from them.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
}

/// Per-row coefficients of the stream batch for one `t_index_list` (docs/ALGORITHM.md §1), one
/// entry per selected timestep, in f32 whatever dtype the networks run in (c_skip is subnormal in
/// f16).
#[derive(Debug, Clone, PartialEq)]
pub struct StepCoefficients {
    /// The selected timesteps t_i = T[t_index_list[i]].
    pub timesteps: Vec<usize>,
    /// a_i = √ᾱ_t.
    pub alpha_sqrt: Vec<f32>,
    /// b_i = √(1 − ᾱ_t).
    pub beta_sqrt: Vec<f32>,
    /// c_skip = σ² / ((s·t)² + σ²), σ = 0.5, s = timestep_scaling.
    pub c_skip: Vec<f32>,
    /// c_out = s·t / √((s·t)² + σ²).
    pub c_out: Vec<f32>,
}

impl LcmScheduler {
    /// Builds the tables for `config`.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|message| Error::param("scheduler_config", message))?;
        let alphas_cumprod = cumprod_f32(config.betas().iter().map(|b| 1.0 - b));
        Ok(Self {
            config,
            alphas_cumprod,
        })
    }

    /// Reads `scheduler_config.json` and builds the tables.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::new(SchedulerConfig::from_file(path)?)
    }

    /// The configuration the tables were built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// ᾱ_t for every training timestep t.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The grid T of `num_inference_steps` timesteps (descending), with
    /// S = [`ORIGINAL_INFERENCE_STEPS`].
    pub fn timesteps(&self, num_inference_steps: usize) -> Result<Vec<usize>> {
        self.timesteps_with_origin(num_inference_steps, ORIGINAL_INFERENCE_STEPS)
    }

    /// The grid T for an explicit origin-schedule length S (diffusers' `original_inference_steps`;
    /// the reference uses its default, 50): k = train_steps // S,
    /// origin = [k·S − 1, …, 2k − 1, k − 1], T[i] = origin[⌊i·S/N⌋].
    pub fn timesteps_with_origin(
        &self,
        num_inference_steps: usize,
        original_steps: usize,
    ) -> Result<Vec<usize>> {
        let train = self.config.num_train_timesteps;
        let n = num_inference_steps;
        if original_steps == 0 || original_steps > train {
            return Err(Error::param(
                "original_inference_steps",
                format!("must be in 1..={train} (num_train_timesteps), got {original_steps}"),
            ));
        }
        if n == 0 || n > original_steps {
            return Err(Error::param(
                "num_inference_steps",
                format!("must be in 1..={original_steps}, got {n}"),
            ));
        }
        let k = train / original_steps;
        // numpy: floor(linspace(0, S, N, endpoint=False)), i.e. floor(i · (S / N)) in float64.
        let step = original_steps as f64 / n as f64;
        Ok((0..n)
            .map(|i| {
                let index = (i as f64 * step).floor() as usize;
                // origin reversed: position p holds k·(S − p) − 1.
                k * (original_steps - index) - 1
            })
            .collect())
    }

    /// Coefficients for explicit timesteps (each < num_train_timesteps).
    pub fn coefficients(&self, timesteps: &[usize]) -> Result<StepCoefficients> {
        let train = self.config.num_train_timesteps;
        let scaling = self.config.timestep_scaling as f32;
        let sigma2 = SIGMA_DATA * SIGMA_DATA;
        let mut out = StepCoefficients {
            timesteps: timesteps.to_vec(),
            alpha_sqrt: Vec::with_capacity(timesteps.len()),
            beta_sqrt: Vec::with_capacity(timesteps.len()),
            c_skip: Vec::with_capacity(timesteps.len()),
            c_out: Vec::with_capacity(timesteps.len()),
        };
        for (i, &t) in timesteps.iter().enumerate() {
            let Some(&alpha_bar) = self.alphas_cumprod.get(t) else {
                return Err(Error::param(
                    format!("timesteps[{i}]"),
                    format!("timestep {t} is outside 0..{train}"),
                ));
            };
            out.alpha_sqrt.push(alpha_bar.sqrt());
            out.beta_sqrt.push((1.0 - alpha_bar).sqrt());
            // float32 tensor arithmetic, as diffusers' get_scalings_for_boundary_condition_discrete
            // runs on the reference's 0-d timestep tensor.
            let scaled = t as f32 * scaling;
            let denom = scaled * scaled + sigma2;
            out.c_skip.push(sigma2 / denom);
            out.c_out.push(scaled / denom.sqrt());
        }
        Ok(out)
    }

    /// Coefficients for `t_index_list` on the grid of `num_inference_steps`
    /// (S = [`ORIGINAL_INFERENCE_STEPS`]).
    pub fn step_coefficients(
        &self,
        num_inference_steps: usize,
        t_index_list: &[usize],
    ) -> Result<StepCoefficients> {
        let grid = self.timesteps(num_inference_steps)?;
        self.coefficients(&select_timesteps(&grid, t_index_list)?)
    }
}

/// t_i = grid[t_index_list[i]], with an error naming the offending index.
pub fn select_timesteps(grid: &[usize], t_index_list: &[usize]) -> Result<Vec<usize>> {
    t_index_list
        .iter()
        .enumerate()
        .map(|(i, &index)| {
            grid.get(index).copied().ok_or_else(|| {
                Error::param(
                    format!("t_index_list[{i}]"),
                    format!(
                        "index {index} is outside the grid of num_inference_steps = {} (0..={})",
                        grid.len(),
                        grid.len().saturating_sub(1)
                    ),
                )
            })
        })
        .collect()
}

/// The `t_index_list` that comes nearest to a list of timesteps on the grid of
/// `num_inference_steps` (Daydream Scope's `denoising_step_list`, e.g. `[1000, 750, 500, 250]`):
/// each timestep t in 0..=`num_train_timesteps` becomes the index whose grid timestep is
/// closest to it (the earlier index on a tie), in ascending index order, which is the
/// descending timestep order both lists walk. 1 to 4 timesteps, as `t_index_list` allows.
pub fn t_index_list_for_timesteps(
    grid: &[usize],
    num_train_timesteps: usize,
    timesteps: &[i64],
) -> Result<Vec<usize>> {
    if timesteps.is_empty() || timesteps.len() > 4 {
        return Err(Error::param(
            "denoising_step_list",
            format!("must have 1 to 4 timesteps; got {}", timesteps.len()),
        ));
    }
    if grid.is_empty() {
        return Err(Error::param("num_inference_steps", "the grid is empty"));
    }
    let mut indices = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        if t < 0 || t as u64 > num_train_timesteps as u64 {
            return Err(Error::param(
                format!("denoising_step_list[{i}]"),
                format!("{t} is not a timestep from 0 to {num_train_timesteps}"),
            ));
        }
        let nearest = grid
            .iter()
            .enumerate()
            .min_by_key(|(index, step)| ((**step as i64 - t).unsigned_abs(), *index))
            .map(|(index, _)| index)
            .unwrap_or(0);
        indices.push(nearest);
    }
    indices.sort_unstable();
    Ok(indices)
}

/// torch's CPU `cumprod` on float32: a float64 running product, each output rounded to float32.
fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut running = 1.0f64;
    values
        .map(|v| {
            running *= v as f64;
            running as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/scheduler/lcm_golden.json"
    );
    const TURBO_CONFIG: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/scheduler/sd_turbo_scheduler_config.json"
    );

    fn golden() -> serde_json::Value {
        let text =
            std::fs::read_to_string(GOLDEN).expect("tests/fixtures/scheduler/lcm_golden.json");
        serde_json::from_str(&text).expect("golden json")
    }

    fn decode_bits(hex: &str) -> Vec<f32> {
        (0..hex.len() / 8)
            .map(|i| f32::from_bits(u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).expect("hex")))
            .collect()
    }

    fn usizes(v: &serde_json::Value) -> Vec<usize> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("integer") as usize)
            .collect()
    }

    fn scheduler_for(config: &serde_json::Value) -> LcmScheduler {
        let config: SchedulerConfig = serde_json::from_value(config.clone()).expect("config");
        LcmScheduler::new(config).expect("scheduler")
    }

    fn assert_bits(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{what}[{i}]: ours {a:e}, diffusers {b:e}"
            );
        }
    }

    /// Asserts ≤ 1 ulp and returns how many values were not bit-identical.
    fn assert_within_one_ulp(ours: &[f32], theirs: &[f32], what: &str) -> usize {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        let mut inexact = 0;
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            // Same sign and positive here, so the bit patterns order like the values.
            let d = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(d <= 1, "{what}[{i}]: ours {a:e}, reference {b:e} ({d} ulp)");
            inexact += (d != 0) as usize;
        }
        inexact
    }

    #[test]
    fn alphas_cumprod_match_diffusers_bitwise() {
        for case in golden()["configs"].as_array().expect("configs") {
            let name = case["name"].as_str().expect("name");
            let ours = scheduler_for(&case["config"]);
            let theirs = decode_bits(case["alphas_cumprod"].as_str().expect("bits"));
            assert_bits(
                ours.alphas_cumprod(),
                &theirs,
                &format!("alphas_cumprod ({name})"),
            );
        }
    }

    #[test]
    fn scope_timesteps_map_to_the_nearest_grid_indices() {
        let sched = LcmScheduler::new(SchedulerConfig::default()).expect("defaults");
        // N = 50: T[i] = 999 - 20 i.
        let grid = sched.timesteps(50).expect("grid");
        assert_eq!(&grid[..3], &[999, 979, 959]);
        let map = |ts: &[i64]| t_index_list_for_timesteps(&grid, 1000, ts);
        // 1000 -> 999 (0); 750 -> 759 (12) over 739 (13); 500 -> 499 (25); 250 -> 259 (37).
        assert_eq!(map(&[1000, 750, 500, 250]).unwrap(), vec![0, 12, 25, 37]);
        // Order in, ascending indices out; a tie (989 is 10 from 999 and 979) takes the earlier.
        assert_eq!(map(&[250, 989]).unwrap(), vec![0, 37]);
        assert_eq!(map(&[0]).unwrap(), vec![49]);
        let coarse = sched.timesteps(4).expect("grid");
        assert_eq!(
            t_index_list_for_timesteps(&coarse, 1000, &[700, 500]).unwrap(),
            vec![1, 2]
        );
        for (bad, says) in [
            (&[][..], "1 to 4"),
            (&[1, 2, 3, 4, 5][..], "1 to 4"),
            (&[-1][..], "denoising_step_list[0]"),
            (&[500, 1001][..], "denoising_step_list[1]"),
        ] {
            let e = map(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn timesteps_match_diffusers_for_every_n() {
        let sched = LcmScheduler::from_file(Path::new(TURBO_CONFIG)).expect("sd-turbo config");
        let mut checked = 0;
        for case in golden()["timesteps"].as_array().expect("timesteps") {
            let s = case["original_inference_steps"].as_u64().expect("S") as usize;
            let n = case["num_inference_steps"].as_u64().expect("N") as usize;
            let theirs = usizes(&case["timesteps"]);
            assert_eq!(
                sched.timesteps_with_origin(n, s).expect("grid"),
                theirs,
                "S={s} N={n}"
            );
            if s == ORIGINAL_INFERENCE_STEPS {
                assert_eq!(sched.timesteps(n).expect("grid"), theirs, "N={n}");
            }
            checked += 1;
        }
        assert_eq!(checked, 150);
        // docs/ALGORITHM.md §1: at N = 50 the S = 100 grid is 999 − 20i, as the reference's S = 50.
        let grid = sched.timesteps(50).expect("grid");
        assert!(grid.iter().enumerate().all(|(i, &t)| t == 999 - 20 * i));
    }

    #[test]
    fn stream_coefficients_match_reference() {
        let (mut inexact, mut total) = (0, 0);
        for case in golden()["stream"].as_array().expect("stream") {
            let sched = scheduler_for(&case["config"]);
            let t_list = usizes(&case["t_index_list"]);
            let n = case["num_inference_steps"].as_u64().expect("N") as usize;
            let s = case["original_inference_steps"].as_u64().expect("S") as usize;
            let grid = sched.timesteps_with_origin(n, s).expect("grid");
            let coeffs = sched
                .coefficients(&select_timesteps(&grid, &t_list).expect("select"))
                .expect("coefficients");
            let what = format!("t_index_list {t_list:?} at N = {n}, S = {s}");
            assert_eq!(coeffs.timesteps, usizes(&case["timesteps"]), "{what}");
            // c_skip involves no square root: bit-identical. The others go through torch's CPU
            // float sqrt, which is MKL's vsSqrt (VML_HA) and is not correctly rounded (about one
            // value in five is 1 ulp off on the reference machine); ours is IEEE sqrt.
            let c_skip = decode_bits(case["c_skip"].as_str().expect("bits"));
            assert_bits(&coeffs.c_skip, &c_skip, &format!("{what}: c_skip"));
            for (field, ours) in [
                ("alpha_sqrt", &coeffs.alpha_sqrt),
                ("beta_sqrt", &coeffs.beta_sqrt),
                ("c_out", &coeffs.c_out),
            ] {
                let theirs = decode_bits(case[field].as_str().expect("bits"));
                inexact += assert_within_one_ulp(ours, &theirs, &format!("{what}: {field}"));
                total += ours.len();
            }
            if s == ORIGINAL_INFERENCE_STEPS || n == 50 {
                assert_eq!(
                    sched.step_coefficients(n, &t_list).expect("coefficients"),
                    coeffs
                );
            }
        }
        eprintln!(
            "sqrt-based coefficients: {inexact}/{total} values 1 ulp off, the rest bit-identical"
        );
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let sched = LcmScheduler::new(SchedulerConfig::default()).expect("default");
        let err = sched.timesteps(0).expect_err("zero steps").to_string();
        assert!(
            err.contains("num_inference_steps") && err.contains("got 0"),
            "{err}"
        );
        let err = sched.timesteps(101).expect_err("too many").to_string();
        assert!(err.contains("1..=100") && err.contains("101"), "{err}");
        let err = sched
            .step_coefficients(4, &[0, 4])
            .expect_err("index")
            .to_string();
        assert!(
            err.contains("t_index_list[1]") && err.contains("index 4"),
            "{err}"
        );
        let err = sched
            .coefficients(&[1000])
            .expect_err("timestep")
            .to_string();
        assert!(
            err.contains("timesteps[0]") && err.contains("1000"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("sdstream-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("scheduler_config.json");
        std::fs::write(&path, r#"{"beta_schedule": "cosine"}"#).expect("write");
        let err = SchedulerConfig::from_file(&path)
            .expect_err("schedule")
            .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("cosine"),
            "{err}"
        );
        std::fs::write(&path, r#"{"rescale_betas_zero_snr": true}"#).expect("write");
        let err = SchedulerConfig::from_file(&path)
            .expect_err("zero snr")
            .to_string();
        assert!(err.contains("rescale_betas_zero_snr"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
