//! Which kernels may run, as a value ([`KernelPolicy`]) rather than as environment variables
//! read once into scattered statics.
//!
//! A process still starts from its environment ([`KernelPolicy::process`], the `SDSTREAM_*`
//! switches read once). A caller that wants another choice for a while (a test comparing two
//! variants in one binary, a host running two engines with different settings) scopes a policy
//! on its thread ([`KernelPolicy::scoped`], [`KernelPolicy::enter`]); every kernel reads
//! [`KernelPolicy::current`] when it is called. The policy only says what is *allowed*: whether
//! the CPU has AMX or AVX512-BF16 is still detected where the kernels need it.
//!
//! The kernels split their work over the persistent workers of `pool`: `pool::run` carries the
//! caller's current policy to every part it runs on another thread, so a scope set on the
//! calling thread holds for all of a kernel's work, wherever it runs (see `pool::run`).
//!
//! This module depends on nothing else in the crate, so that anything may read it.

use std::cell::Cell;
use std::ffi::OsString;
use std::sync::OnceLock;

/// Where Winograd's 3×3 convolution runs (`SDSTREAM_WINOGRAD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Winograd {
    /// The kernel's own choice: wide enough layers over enough tiles, F(4×4, 3×3) where its
    /// tiles are many (`auto`, the default).
    #[default]
    Auto,
    /// Never (`off` or `0`): for comparisons against the im2col GEMM.
    Off,
    /// F(2×2, 3×3) for every f32 3×3 stride-1 convolution, whatever its size (`f2`): tests of
    /// the arithmetic on small networks, and comparisons.
    F2,
    /// F(4×4, 3×3) for every f32 3×3 stride-1 convolution, whatever its size (`f4`).
    F4,
}

/// Which devices' networks keep their feature maps channels-last (`SDSTREAM_CHANNELS_LAST`;
/// see [`KernelPolicy::channels_last`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ChannelsLast {
    /// On CUDA devices only (`auto`, empty or unset: the default). Measured on an H200 (sd-turbo
    /// 512², 1 step, TAESD, f16, stage sync on): 13.79 ms a frame against 18.56 ms
    /// channels-first; on the CPU it is slower (docs/GPU.md, "Channels last").
    #[default]
    Auto,
    /// On every device (any other value but `0` and `off`, as the switch it was): on the CPU,
    /// to check the GPU's code against the goldens.
    On,
    /// On no device (`0` or `off`): for comparisons against channels-first maps.
    Off,
}

impl ChannelsLast {
    /// Whether networks on a device keep their maps channels-last under this choice; `cuda` is
    /// whether the device is a CUDA device.
    pub fn on(self, cuda: bool) -> bool {
        match self {
            ChannelsLast::Auto => cuda,
            ChannelsLast::On => true,
            ChannelsLast::Off => false,
        }
    }

    /// The variable's value that asks for this choice: `auto`, `on` or `off`.
    pub fn name(self) -> &'static str {
        match self {
            ChannelsLast::Auto => "auto",
            ChannelsLast::On => "on",
            ChannelsLast::Off => "off",
        }
    }
}

/// Which of sdstream's kernels may run. `Default` is what a process gets with none of the
/// `SDSTREAM_*` switches set: every fast kernel allowed where the hardware has it. Cheap to copy
/// and to compare, and hashable, so that a host can key what it builds (a model, a captured
/// CUDA graph) by the policy it was built under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelPolicy {
    /// The CPU runs the portable twins (built from candle ops) instead of the CPU kernels: what
    /// non-CPU devices run, so that their code path can be checked against the goldens without
    /// a GPU (`SDSTREAM_PORTABLE_KERNELS`; see [`crate::cpu_kernels`]).
    pub portable: bool,
    /// The bf16 GEMM may use AMX tiles where the CPU and OS allow them (off with
    /// `SDSTREAM_NO_AMX`, for comparisons; see [`crate::gemm_bf16::amx_available`]).
    pub amx: bool,
    /// The bf16 GEMM may use AVX512-BF16 where the CPU has it (off with
    /// `SDSTREAM_NO_AVX512_BF16`; see [`crate::gemm_bf16::avx512_bf16_available`]).
    pub avx512_bf16: bool,
    /// Channels-last f32 convolutions may take the direct AVX2 kernel on CPUs it suits (off with
    /// `SDSTREAM_NO_DIRECT_CONV`: the GEMM path runs, for comparisons).
    pub direct_conv: bool,
    /// Where Winograd's 3×3 convolution runs (`SDSTREAM_WINOGRAD`).
    pub winograd: Winograd,
    /// sdstream's own CUDA kernels replace the portable twins on CUDA devices (off with
    /// `SDSTREAM_CUDA_KERNELS=0`; see [`crate::cuda_kernels`]).
    pub cuda_kernels: bool,
    /// The fused CUDA attention kernel may run (off with `SDSTREAM_CUDA_ATTENTION=0`; see
    /// [`crate::attention::fused_on_cuda`]).
    pub cuda_attention: bool,
    /// Where the fused CUDA attention runs, it is the register-level kernel (attention.cu's
    /// `flash_attention_*`: one pass, the online softmax in registers, `mma.sync` and
    /// `ldmatrix`, double-buffered `cp.async` tiles) instead of the WMMA kernel (on with
    /// `SDSTREAM_CUDA_FLASH_ATTENTION`). Off by default until a GPU run has checked and
    /// measured it: the WMMA kernel took 0.487 ms on an H200 for a self-attention that cuDNN's
    /// fused kernel does in 0.077 ms.
    pub cuda_flash_attention: bool,
    /// Where the fused CUDA attention runs, cuDNN's fused attention runs first (feature
    /// `cudnn`; `cudnn_attention`: one graph of cuDNN's backend API that its flash-attention
    /// engines take), and attention.cu's kernel wherever cuDNN refuses a geometry (on with
    /// `SDSTREAM_CUDA_CUDNN_ATTENTION`). Off by default until a GPU run has checked and measured
    /// it: torch's call of cuDNN's kernel took 0.077 ms on an H200 for the self-attention the
    /// WMMA kernel took 0.487 ms for.
    pub cuda_cudnn_attention: bool,
    /// Where cuDNN's fused attention runs a call of more than one row, its plan is built for a
    /// dynamic-shape graph with the kernel cache of its geometry, shared by every thread and
    /// every row count: the batch widths a cross-stream batcher forms (2 to 8) then compile
    /// the engine's kernel once instead of once each (on with `SDSTREAM_CUDA_CUDNN_KERNEL_CACHE`;
    /// see `cudnn_attention`). Calls of one row keep their static plans. Off by default until a
    /// GPU run has checked it.
    pub cuda_cudnn_kernel_cache: bool,
    /// Channels-last convolutions through cuDNN apply their bias, residual and ReLU in the same
    /// call (`cudnnConvolutionBiasActivationForward`) instead of three passes of their own over
    /// the output (on with `SDSTREAM_CUDA_FUSED_CONV`; see `cudnn_conv`). Off by default until
    /// a GPU run has checked and measured it.
    pub cuda_fused_conv: bool,
    /// Channels-last convolutions through cuDNN (with their epilogue where `cuda_fused_conv`
    /// asks for it) run as graphs of cuDNN's backend API, each geometry's engine chosen on its
    /// first call on a thread by timing up to four of the engines whose arithmetic is the plain
    /// formula's (`cudnn_conv_graph`), instead of the legacy call's one algorithm, the
    /// implicit-precomputed GEMM (on with `SDSTREAM_CUDA_CONV_ENGINES`). Off by default until a
    /// GPU run has checked and measured it.
    pub cuda_conv_engines: bool,
    /// Channels-last 3×3 convolutions of a nearest-2× upsampled map on a CUDA device (the
    /// UNet's and the ControlNets' upsamplers, TAESD's and the VAE's decoders) run as one 2×2
    /// convolution with four times the outputs over the map itself, whose four phases ops.cu's
    /// `phase_interleave` puts in their places with the bias: 16 products a pixel of the
    /// upsampled map's input instead of 36, and the upsampled map (a broadcast copy, 4× the
    /// input) never made (on with `SDSTREAM_CUDA_PHASE_CONV`; see `conv::phase_filters`). Off by
    /// default until a GPU run has checked and measured it.
    pub cuda_phase_conv: bool,
    /// Channels-last GroupNorm on a CUDA device runs group_norm.cu's `_rows` kernels, whose
    /// warps read whole pixels (all channels, consecutive addresses, 32-bit indices), instead of
    /// the kernels that walk one group's channels C apart with 64-bit divisions per value (61
    /// calls took 1.69 ms of an H200 frame under the profiler). On with
    /// `SDSTREAM_CUDA_GROUP_NORM_ROWS`; off by default until a GPU run has checked and
    /// measured it (kernels/emulate checks its arithmetic on the CPU).
    pub cuda_group_norm_rows: bool,
    /// LayerNorm on a CUDA device runs layer_norm.cu's kernel (a warp per row held in
    /// registers, 16-byte loads, the row read once) instead of candle's (32 threads a row, or
    /// 1,024 from 1,024 values on, 2-byte loads, the row read twice): 48 calls a frame of
    /// sd-turbo, each batched row adding to them. On with `SDSTREAM_CUDA_LAYER_NORM`; off by
    /// default until a GPU run has checked and measured it (kernels/emulate checks its
    /// arithmetic on the CPU).
    pub cuda_layer_norm: bool,
    /// Linear layers on a CUDA device add their bias, and the residual where the network has
    /// one, in cuBLASLt's epilogue of the product (`cublaslt_linear`) instead of two passes of
    /// their own over the output (on with `SDSTREAM_CUDA_FUSED_LINEAR`; off by default until a
    /// GPU run has checked and measured it).
    pub cuda_fused_linear: bool,
    /// The in-place adds on a CUDA device move 16 bytes a load where the operands allow it
    /// (ops.cu's `add_in_place_vec_*`: the same bits as the scalar kernel; off with
    /// `SDSTREAM_CUDA_VECTOR_ADDS=0`, for comparisons, and for the GPU kit to fall back on
    /// should the device refuse it).
    pub cuda_vector_adds: bool,
    /// Forward passes on CUDA devices are captured and replayed as CUDA graphs (off with
    /// `SDSTREAM_CUDA_GRAPHS=0`; read by sdstream-models' graph cache).
    pub cuda_graphs: bool,
    /// On which devices the networks (the UNet, its ControlNets, TAESD and the VAE) keep their
    /// feature maps channels-last (`[B, H, W, C]`) between their layers
    /// (`SDSTREAM_CHANNELS_LAST`; see [`KernelPolicy::channels_last_on`]; read when a network
    /// loads, which lays its convolution weights out for it; the CPU kernels run the
    /// autoencoders channels-last anyway). On a CUDA device with cuDNN that is the layout its
    /// tensor-core convolutions take without transposing around every call: on CUDA devices
    /// by default ([`ChannelsLast::Auto`]; docs/GPU.md, "Channels last"). On the CPU it is
    /// slower, and [`ChannelsLast::On`] checks the same code against the goldens there.
    pub channels_last: ChannelsLast,
    /// A frame crosses to and from a CUDA device through page-locked host buffers, kept per
    /// thread and reused, so that the copies are the DMA engine's alone (on with
    /// `SDSTREAM_CUDA_PINNED`; see `transfer`). Off by default until a GPU run has measured it.
    pub cuda_pinned: bool,
    /// The preprocessors that can run on a CUDA device do, where the frame is (`canny` with a
    /// kernel of its own, the other pixel processors as tensor operations; see
    /// [`crate::preprocess_on_device`]), instead of a download, the host's code and an upload
    /// (off with `SDSTREAM_CUDA_PREPROCESS=0`). Measured on an H200: canny bit for bit the
    /// host's, the float processors within 1e-5 of the host's steps, a frame with one
    /// ControlNet 24.49 ms against 33.39 ms on the host's way.
    pub cuda_preprocess: bool,
    /// A CUDA device opened for frames ([`crate::prepare_device`]) keeps cudarc's event
    /// tracking, under which every buffer allocated makes two CUDA events and every buffer
    /// freed destroys them (on with `SDSTREAM_CUDA_EVENT_TRACKING`). Off by default: the events
    /// only order work across streams of one context, which sdstream never makes (each thread
    /// queues on its own per-thread stream, and what crosses threads waits on `QueuedWork`),
    /// so they cost two driver calls per allocation and two per free for nothing (a frame run
    /// op by op allocates about once per kernel: a thousand times at 512²).
    pub cuda_event_tracking: bool,
    /// A batch of several streams' calls on a CUDA device hands each call its rows with a CUDA
    /// event that the caller's stream waits on, instead of the running thread waiting for the
    /// device before it hands them out; the batch's cost is timed between two events on the
    /// device (on with `SDSTREAM_CUDA_BATCH_EVENTS`; see `sdstream::pipeline::cross_stream`).
    /// The host then queues a round's next batch while the device still runs this one, where
    /// every stage change left the device idle for the hand-back's wake-ups and the streams'
    /// own work between their calls. Off by default until a GPU has run its test.
    pub cuda_batch_events: bool,
    /// A UNet or ControlNet loaded under this policy projects the time embedding for all its
    /// resnets in one product (their `time_emb_proj` weights concatenated at load, each
    /// resnet's own a view of its rows) instead of one small product and bias add per resnet:
    /// 22 of each a sd-turbo UNet call, launch-bound on a GPU. Read when the network is built,
    /// on every device (the CPU's for tests). On with `SDSTREAM_FUSED_TIME_PROJECTIONS`; off by
    /// default until a GPU run has checked it.
    pub fused_time_projections: bool,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        KernelPolicy {
            portable: false,
            amx: true,
            avx512_bf16: true,
            direct_conv: true,
            winograd: Winograd::Auto,
            cuda_kernels: true,
            cuda_attention: true,
            cuda_flash_attention: false,
            cuda_cudnn_attention: false,
            cuda_cudnn_kernel_cache: false,
            cuda_fused_conv: false,
            cuda_conv_engines: false,
            cuda_phase_conv: false,
            cuda_group_norm_rows: false,
            cuda_layer_norm: false,
            cuda_fused_linear: false,
            cuda_vector_adds: true,
            cuda_graphs: true,
            channels_last: ChannelsLast::Auto,
            cuda_pinned: false,
            cuda_preprocess: true,
            cuda_event_tracking: false,
            cuda_batch_events: false,
            fused_time_projections: false,
        }
    }
}

thread_local! {
    /// The innermost policy scoped on this thread, if any. A `Cell` of a `Copy` value: reading it
    /// is a thread-local load, cheap enough for every kernel call.
    static SCOPED: Cell<Option<KernelPolicy>> = const { Cell::new(None) };
}

impl KernelPolicy {
    /// The policy the process's environment asks for, read now (see [`KernelPolicy::from_vars`]
    /// for the variables and their meanings).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// The policy the variables `lookup` returns ask for (`lookup(name)` is the value of the
    /// variable `name`, `None` where it is unset). A pure function of `lookup`, so that the
    /// parsing is tested without touching the process's environment. The meanings:
    /// - `SDSTREAM_PORTABLE_KERNELS`, `SDSTREAM_NO_AMX`, `SDSTREAM_NO_AVX512_BF16`,
    ///   `SDSTREAM_NO_DIRECT_CONV`, `SDSTREAM_CUDA_PINNED`, `SDSTREAM_CUDA_FLASH_ATTENTION`,
    ///   `SDSTREAM_CUDA_CUDNN_ATTENTION`,
    ///   `SDSTREAM_CUDA_FUSED_CONV`, `SDSTREAM_CUDA_PHASE_CONV`, `SDSTREAM_CUDA_GROUP_NORM_ROWS`,
    ///   `SDSTREAM_CUDA_LAYER_NORM`, `SDSTREAM_CUDA_FUSED_LINEAR`, `SDSTREAM_CUDA_CUDNN_KERNEL_CACHE`,
    ///   `SDSTREAM_CUDA_EVENT_TRACKING`, `SDSTREAM_CUDA_BATCH_EVENTS`,
    ///   `SDSTREAM_FUSED_TIME_PROJECTIONS` are switches, on when set to anything but nothing or
    ///   `0`;
    /// - `SDSTREAM_CUDA_KERNELS`, `SDSTREAM_CUDA_ATTENTION`, `SDSTREAM_CUDA_GRAPHS`,
    ///   `SDSTREAM_CUDA_PREPROCESS`, `SDSTREAM_CUDA_VECTOR_ADDS` turn their feature off when
    ///   exactly `0`;
    /// - `SDSTREAM_CHANNELS_LAST` is `auto` (or empty, or unset: CUDA devices only), `0` or `off`
    ///   (no device), anything else on (every device, as when it was a switch);
    /// - `SDSTREAM_WINOGRAD` is `auto` (or empty, or unset), `off` (or `0`), `f2` or `f4`;
    ///   anything else is `auto`, with a warning (the kernels' choice is never worse than a
    ///   typo's).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        let switch = |name: &str| lookup(name).is_some_and(|v| !v.is_empty() && v != "0");
        let off = |name: &str| lookup(name).is_some_and(|v| v == "0");
        let winograd = match lookup("SDSTREAM_WINOGRAD") {
            None => Winograd::Auto,
            Some(value) => match value.to_str() {
                Some("off" | "0") => Winograd::Off,
                Some("f2") => Winograd::F2,
                Some("f4") => Winograd::F4,
                Some("" | "auto") => Winograd::Auto,
                Some(other) => {
                    tracing::warn!(
                        "SDSTREAM_WINOGRAD={other:?} is not auto, off, f2 or f4; using auto"
                    );
                    Winograd::Auto
                }
                // As `std::env::var` read it before: not Unicode, so not a name it knows.
                None => Winograd::Auto,
            },
        };
        let channels_last = match lookup("SDSTREAM_CHANNELS_LAST") {
            None => ChannelsLast::Auto,
            Some(value) if value.is_empty() || value == "auto" => ChannelsLast::Auto,
            Some(value) if value == "0" || value == "off" => ChannelsLast::Off,
            Some(_) => ChannelsLast::On,
        };
        KernelPolicy {
            portable: switch("SDSTREAM_PORTABLE_KERNELS"),
            amx: !switch("SDSTREAM_NO_AMX"),
            avx512_bf16: !switch("SDSTREAM_NO_AVX512_BF16"),
            direct_conv: !switch("SDSTREAM_NO_DIRECT_CONV"),
            winograd,
            cuda_kernels: !off("SDSTREAM_CUDA_KERNELS"),
            cuda_attention: !off("SDSTREAM_CUDA_ATTENTION"),
            cuda_flash_attention: switch("SDSTREAM_CUDA_FLASH_ATTENTION"),
            cuda_cudnn_attention: switch("SDSTREAM_CUDA_CUDNN_ATTENTION"),
            cuda_cudnn_kernel_cache: switch("SDSTREAM_CUDA_CUDNN_KERNEL_CACHE"),
            cuda_fused_conv: switch("SDSTREAM_CUDA_FUSED_CONV"),
            cuda_conv_engines: switch("SDSTREAM_CUDA_CONV_ENGINES"),
            cuda_phase_conv: switch("SDSTREAM_CUDA_PHASE_CONV"),
            cuda_group_norm_rows: switch("SDSTREAM_CUDA_GROUP_NORM_ROWS"),
            cuda_layer_norm: switch("SDSTREAM_CUDA_LAYER_NORM"),
            cuda_fused_linear: switch("SDSTREAM_CUDA_FUSED_LINEAR"),
            cuda_vector_adds: !off("SDSTREAM_CUDA_VECTOR_ADDS"),
            cuda_graphs: !off("SDSTREAM_CUDA_GRAPHS"),
            channels_last,
            cuda_pinned: switch("SDSTREAM_CUDA_PINNED"),
            cuda_preprocess: !off("SDSTREAM_CUDA_PREPROCESS"),
            cuda_event_tracking: switch("SDSTREAM_CUDA_EVENT_TRACKING"),
            cuda_batch_events: switch("SDSTREAM_CUDA_BATCH_EVENTS"),
            fused_time_projections: switch("SDSTREAM_FUSED_TIME_PROJECTIONS"),
        }
    }

    /// Whether networks loaded on `device` keep their maps channels-last under this policy
    /// ([`KernelPolicy::channels_last`]: by default on CUDA devices only). The CPU kernels run
    /// the autoencoders channels-last whatever this says (their own rule, where they load).
    pub fn channels_last_on(&self, device: &candle_core::Device) -> bool {
        self.channels_last.on(device.is_cuda())
    }

    /// The process's policy: [`KernelPolicy::from_env`], read on the first call and kept, as
    /// the switches were read before they were a value (a test binary that sets a variable
    /// before any kernel runs still gets it).
    pub fn process() -> Self {
        static PROCESS: OnceLock<KernelPolicy> = OnceLock::new();
        *PROCESS.get_or_init(Self::from_env)
    }

    /// The policy kernels called now on this thread follow: the innermost one scoped here
    /// ([`KernelPolicy::scoped`], [`KernelPolicy::enter`]), else [`KernelPolicy::process`]. On
    /// the kernels' pool workers, the policy of the caller whose part they run.
    #[inline]
    pub fn current() -> Self {
        SCOPED.with(Cell::get).unwrap_or_else(Self::process)
    }

    /// `f()` with `self` as this thread's [`current`](KernelPolicy::current) policy (and its
    /// kernels' pool parts'); the previous one is back when `f` returns or unwinds.
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        let _guard = self.enter();
        f()
    }

    /// Makes `self` this thread's [`current`](KernelPolicy::current) policy until the guard
    /// drops (also on unwinding). For callers whose scope is not one closure; guards must drop
    /// in the reverse order of their making, as a stack of scopes does.
    pub fn enter(self) -> PolicyGuard {
        PolicyGuard {
            previous: SCOPED.with(|s| s.replace(Some(self))),
            _this_thread: std::marker::PhantomData,
        }
    }
}

/// While alive, its policy is this thread's [`KernelPolicy::current`]; dropping it restores the
/// one before. Not `Send`: the scope belongs to the thread that made it.
#[must_use = "the policy holds only while the guard is alive"]
pub struct PolicyGuard {
    previous: Option<KernelPolicy>,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        SCOPED.with(|s| s.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one field of a policy.
    type Field = fn(KernelPolicy) -> bool;

    fn with(vars: &[(&str, &str)]) -> KernelPolicy {
        KernelPolicy::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn no_variables_give_the_default() {
        assert_eq!(with(&[]), KernelPolicy::default());
    }

    #[test]
    fn switches_are_on_when_set_to_anything_but_nothing_or_zero() {
        let cases: [(&str, Field, bool); 17] = [
            ("SDSTREAM_CUDA_CONV_ENGINES", |p| p.cuda_conv_engines, false),
            ("SDSTREAM_CUDA_BATCH_EVENTS", |p| p.cuda_batch_events, false),
            (
                "SDSTREAM_FUSED_TIME_PROJECTIONS",
                |p| p.fused_time_projections,
                false,
            ),
            (
                "SDSTREAM_CUDA_EVENT_TRACKING",
                |p| p.cuda_event_tracking,
                false,
            ),
            (
                "SDSTREAM_CUDA_CUDNN_ATTENTION",
                |p| p.cuda_cudnn_attention,
                false,
            ),
            (
                "SDSTREAM_CUDA_CUDNN_KERNEL_CACHE",
                |p| p.cuda_cudnn_kernel_cache,
                false,
            ),
            ("SDSTREAM_CUDA_PHASE_CONV", |p| p.cuda_phase_conv, false),
            ("SDSTREAM_CUDA_FUSED_LINEAR", |p| p.cuda_fused_linear, false),
            ("SDSTREAM_CUDA_LAYER_NORM", |p| p.cuda_layer_norm, false),
            ("SDSTREAM_CUDA_FUSED_CONV", |p| p.cuda_fused_conv, false),
            (
                "SDSTREAM_CUDA_GROUP_NORM_ROWS",
                |p| p.cuda_group_norm_rows,
                false,
            ),
            ("SDSTREAM_PORTABLE_KERNELS", |p| p.portable, false),
            ("SDSTREAM_CUDA_PINNED", |p| p.cuda_pinned, false),
            (
                "SDSTREAM_CUDA_FLASH_ATTENTION",
                |p| p.cuda_flash_attention,
                false,
            ),
            ("SDSTREAM_NO_AMX", |p| p.amx, true),
            ("SDSTREAM_NO_AVX512_BF16", |p| p.avx512_bf16, true),
            ("SDSTREAM_NO_DIRECT_CONV", |p| p.direct_conv, true),
        ];
        for (name, field, default) in cases {
            assert_eq!(field(with(&[])), default, "{name} unset");
            assert_eq!(field(with(&[(name, "")])), default, "{name} empty");
            assert_eq!(field(with(&[(name, "0")])), default, "{name}=0");
            for on in ["1", "yes", "true", "00"] {
                assert_eq!(field(with(&[(name, on)])), !default, "{name}={on}");
            }
            // Nothing else moves.
            let mut others = with(&[(name, "1")]);
            let default_policy = KernelPolicy::default();
            match name {
                "SDSTREAM_PORTABLE_KERNELS" => others.portable = default_policy.portable,
                "SDSTREAM_NO_AMX" => others.amx = default_policy.amx,
                "SDSTREAM_NO_AVX512_BF16" => others.avx512_bf16 = default_policy.avx512_bf16,
                "SDSTREAM_CUDA_PINNED" => others.cuda_pinned = default_policy.cuda_pinned,
                "SDSTREAM_CUDA_FLASH_ATTENTION" => {
                    others.cuda_flash_attention = default_policy.cuda_flash_attention
                }
                "SDSTREAM_CUDA_FUSED_CONV" => {
                    others.cuda_fused_conv = default_policy.cuda_fused_conv
                }
                "SDSTREAM_CUDA_CONV_ENGINES" => {
                    others.cuda_conv_engines = default_policy.cuda_conv_engines
                }
                "SDSTREAM_CUDA_GROUP_NORM_ROWS" => {
                    others.cuda_group_norm_rows = default_policy.cuda_group_norm_rows
                }
                "SDSTREAM_CUDA_FUSED_LINEAR" => {
                    others.cuda_fused_linear = default_policy.cuda_fused_linear
                }
                "SDSTREAM_CUDA_LAYER_NORM" => {
                    others.cuda_layer_norm = default_policy.cuda_layer_norm
                }
                "SDSTREAM_CUDA_PHASE_CONV" => {
                    others.cuda_phase_conv = default_policy.cuda_phase_conv
                }
                "SDSTREAM_CUDA_CUDNN_ATTENTION" => {
                    others.cuda_cudnn_attention = default_policy.cuda_cudnn_attention
                }
                "SDSTREAM_CUDA_CUDNN_KERNEL_CACHE" => {
                    others.cuda_cudnn_kernel_cache = default_policy.cuda_cudnn_kernel_cache
                }
                "SDSTREAM_CUDA_EVENT_TRACKING" => {
                    others.cuda_event_tracking = default_policy.cuda_event_tracking
                }
                "SDSTREAM_CUDA_BATCH_EVENTS" => {
                    others.cuda_batch_events = default_policy.cuda_batch_events
                }
                "SDSTREAM_FUSED_TIME_PROJECTIONS" => {
                    others.fused_time_projections = default_policy.fused_time_projections
                }
                _ => others.direct_conv = default_policy.direct_conv,
            }
            assert_eq!(others, default_policy, "{name} moves only its field");
        }
    }

    #[test]
    fn cuda_switches_are_off_only_at_zero() {
        let cases: [(&str, Field); 5] = [
            ("SDSTREAM_CUDA_VECTOR_ADDS", |p| p.cuda_vector_adds),
            ("SDSTREAM_CUDA_KERNELS", |p| p.cuda_kernels),
            ("SDSTREAM_CUDA_ATTENTION", |p| p.cuda_attention),
            ("SDSTREAM_CUDA_GRAPHS", |p| p.cuda_graphs),
            ("SDSTREAM_CUDA_PREPROCESS", |p| p.cuda_preprocess),
        ];
        for (name, field) in cases {
            assert!(field(with(&[])), "{name} unset");
            assert!(field(KernelPolicy::default()), "{name} by default");
            assert!(!field(with(&[(name, "0")])), "{name}=0");
            for on in ["", "1", "off", "00"] {
                assert!(field(with(&[(name, on)])), "{name}={on:?}");
            }
            // Nothing else moves.
            let mut others = with(&[(name, "0")]);
            let default_policy = KernelPolicy::default();
            match name {
                "SDSTREAM_CUDA_KERNELS" => others.cuda_kernels = default_policy.cuda_kernels,
                "SDSTREAM_CUDA_ATTENTION" => others.cuda_attention = default_policy.cuda_attention,
                "SDSTREAM_CUDA_GRAPHS" => others.cuda_graphs = default_policy.cuda_graphs,
                "SDSTREAM_CUDA_VECTOR_ADDS" => {
                    others.cuda_vector_adds = default_policy.cuda_vector_adds
                }
                _ => others.cuda_preprocess = default_policy.cuda_preprocess,
            }
            assert_eq!(others, default_policy, "{name} moves only its field");
        }
    }

    /// `SDSTREAM_CHANNELS_LAST`: CUDA devices only unless set, `0` or `off` for none, any
    /// other value for every device (as when it was a switch).
    #[test]
    fn channels_last_names_its_policy() {
        let cases = [
            ("", ChannelsLast::Auto),
            ("auto", ChannelsLast::Auto),
            ("0", ChannelsLast::Off),
            ("off", ChannelsLast::Off),
            ("1", ChannelsLast::On),
            ("on", ChannelsLast::On),
            ("yes", ChannelsLast::On),
            ("00", ChannelsLast::On),
        ];
        for (value, want) in cases {
            let policy = with(&[("SDSTREAM_CHANNELS_LAST", value)]);
            assert_eq!(policy.channels_last, want, "{value:?}");
            assert_eq!(
                KernelPolicy {
                    channels_last: ChannelsLast::Auto,
                    ..policy
                },
                KernelPolicy::default(),
                "{value:?} moves only its field"
            );
        }
        assert_eq!(with(&[]).channels_last, ChannelsLast::Auto);
        assert_eq!(KernelPolicy::default().channels_last, ChannelsLast::Auto);
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let not_unicode = KernelPolicy::from_vars(|name| {
                (name == "SDSTREAM_CHANNELS_LAST").then(|| OsString::from_vec(vec![b'o', 0xff]))
            });
            assert_eq!(not_unicode.channels_last, ChannelsLast::On);
        }
        // Which devices each choice covers: (choice, on CUDA, on other devices).
        for (choice, cuda, other) in [
            (ChannelsLast::Auto, true, false),
            (ChannelsLast::On, true, true),
            (ChannelsLast::Off, false, false),
        ] {
            assert_eq!(choice.on(true), cuda, "{choice:?} on CUDA");
            assert_eq!(choice.on(false), other, "{choice:?} elsewhere");
            let policy = KernelPolicy {
                channels_last: choice,
                ..KernelPolicy::default()
            };
            assert_eq!(
                policy.channels_last_on(&candle_core::Device::Cpu),
                other,
                "{choice:?} on the CPU"
            );
            let name = choice.name();
            assert_eq!(
                with(&[("SDSTREAM_CHANNELS_LAST", name)]).channels_last,
                choice,
                "{name}"
            );
        }
    }

    #[test]
    fn winograd_names_its_policy() {
        let cases = [
            ("", Winograd::Auto),
            ("auto", Winograd::Auto),
            ("off", Winograd::Off),
            ("0", Winograd::Off),
            ("f2", Winograd::F2),
            ("f4", Winograd::F4),
            ("F4", Winograd::Auto),
            ("fast", Winograd::Auto),
        ];
        for (value, want) in cases {
            assert_eq!(
                with(&[("SDSTREAM_WINOGRAD", value)]).winograd,
                want,
                "{value:?}"
            );
        }
        assert_eq!(with(&[]).winograd, Winograd::Auto);
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let not_unicode = KernelPolicy::from_vars(|name| {
                (name == "SDSTREAM_WINOGRAD").then(|| OsString::from_vec(vec![b'f', 0xff]))
            });
            assert_eq!(not_unicode.winograd, Winograd::Auto);
        }
    }

    fn marked(winograd: Winograd) -> KernelPolicy {
        KernelPolicy {
            winograd,
            ..KernelPolicy::process()
        }
    }

    #[test]
    fn scopes_nest_and_restore() {
        let outside = KernelPolicy::current();
        marked(Winograd::F2).scoped(|| {
            assert_eq!(KernelPolicy::current(), marked(Winograd::F2));
            let inner = marked(Winograd::F4).scoped(KernelPolicy::current);
            assert_eq!(inner, marked(Winograd::F4));
            assert_eq!(KernelPolicy::current(), marked(Winograd::F2));
            {
                let _guard = marked(Winograd::Off).enter();
                assert_eq!(KernelPolicy::current(), marked(Winograd::Off));
            }
            assert_eq!(KernelPolicy::current(), marked(Winograd::F2));
        });
        assert_eq!(KernelPolicy::current(), outside);
    }

    #[test]
    fn a_panic_restores_the_outer_scope() {
        let outside = KernelPolicy::current();
        marked(Winograd::F2).scoped(|| {
            let caught = std::panic::catch_unwind(|| {
                marked(Winograd::F4).scoped(|| {
                    assert_eq!(KernelPolicy::current().winograd, Winograd::F4);
                    panic!("inside the scope");
                })
            });
            assert!(caught.is_err());
            assert_eq!(KernelPolicy::current(), marked(Winograd::F2));
        });
        assert_eq!(KernelPolicy::current(), outside);
    }

    #[test]
    fn another_thread_keeps_its_own_policy() {
        marked(Winograd::F4).scoped(|| {
            let there = std::thread::spawn(KernelPolicy::current).join().unwrap();
            assert_eq!(there, KernelPolicy::process());
        });
    }

    /// Every part of a pool call, on the caller or on a worker (or on a thread started for the
    /// call when the pool is busy), sees the caller's policy; afterwards the workers are back
    /// to their own (the next caller's, or none).
    #[test]
    fn a_scoped_policy_reaches_the_pool_s_parts() {
        use std::sync::Mutex;
        let parts = crate::threads().max(2) + 1; // some parts beyond the pool: own threads too
        for winograd in [Winograd::Off, Winograd::F2, Winograd::F4] {
            let policy = KernelPolicy {
                portable: !KernelPolicy::process().portable,
                ..marked(winograd)
            };
            for parts in [2, parts] {
                let seen = Mutex::new(Vec::new());
                policy.scoped(|| {
                    crate::pool::run(parts, &|part| {
                        seen.lock().unwrap().push((part, KernelPolicy::current()));
                    })
                });
                let seen = seen.into_inner().unwrap();
                assert_eq!(seen.len(), parts);
                for (part, got) in seen {
                    assert_eq!(got, policy, "part {part} of {parts}");
                }
            }
            // Without a scope the parts see the process's policy, not the last caller's.
            let seen = Mutex::new(Vec::new());
            crate::pool::run(2, &|_| seen.lock().unwrap().push(KernelPolicy::current()));
            for got in seen.into_inner().unwrap() {
                assert_eq!(got, KernelPolicy::process());
            }
        }
    }

    /// A kernel started from inside a part (which runs on threads of its own) still sees it.
    #[test]
    fn nested_pool_calls_keep_the_policy() {
        use std::sync::Mutex;
        let policy = marked(Winograd::F2);
        let seen = Mutex::new(Vec::new());
        policy.scoped(|| {
            crate::pool::run(2, &|_| {
                crate::pool::run(2, &|_| seen.lock().unwrap().push(KernelPolicy::current()));
            })
        });
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 4);
        assert!(seen.iter().all(|&p| p == policy));
    }
}
