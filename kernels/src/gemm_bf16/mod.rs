//! The CPU's bf16 GEMM: `C = A·B` with both operands rounded to bf16 (round to nearest even)
//! and every product summed in f32, written as f32. What `dtype: "bf16"` means on the CPU (see
//! [`Scope`]): maps, norms and softmax stay in f32; only the multiplicands of the GEMMs lose
//! precision, as torch's CPU autocast does.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later) the 32×32 blocks of `C` accumulate in
//! four tile registers, each `TDPBF16PS` instruction doing 16×16×32 multiply-adds; measured at
//! about 3.3 TFLOP/s on one core of this project's machine against about 180 GFLOP/s for the f32
//! GEMM. Elsewhere a portable block computes the same kind of sums (rounded operands, each
//! pair of products added in f32, then to the running f32 sum), 4 rows × 16 columns of `C` at a
//! time, in AVX2 intrinsics where the CPU has AVX2: on 2 Zen 3 cores 62–111 GFLOP/s
//! against 111–171 for the f32 GEMM (5 before it had a kernel of its own), so that `dtype:
//! "bf16"` there gives bf16's pictures at about two thirds of f32's speed, not a thirtieth.
//!
//! Both operands are packed once into the tiles' own layouts, so every tile load is 1 KiB of
//! consecutive memory: `A` ([`PackedA`]) as 16-row strips of 16×32 blocks, `B` ([`PackedB`])
//! as 16-column strips of blocks holding 16 pairs of consecutive `k` for each column (the pair
//! layout `TDPBF16PS` reads). A weight is packed once per layer and kept; activations are packed
//! on each call into a buffer the thread keeps.

use std::cell::Cell;

use candle_core::{DType, Tensor};

use super::{SharedMut, for_each_chunk, for_each_range};

/// Rows or columns of one tile.
const TILE: usize = 16;
/// `k` values per tile block (64 bytes of bf16 per tile row).
const K_BLOCK: usize = 32;
/// Elements of one packed tile block.
const BLOCK_LEN: usize = TILE * K_BLOCK;
/// Rows (and columns) of the `C` block the kernel keeps in its four accumulator tiles.
const PANEL: usize = 2 * TILE;
/// `k` blocks per pass over `C`: 1,024 values of `k`, so that a 32-row strip of `A` (64 KiB)
/// and a [`N_PANELS_PER_PASS`]-panel block of `B` (512 KiB) stay in the core's L2 cache.
const K_BLOCKS_PER_PASS: usize = 32;
/// 32-column panels of `B` per pass.
const N_PANELS_PER_PASS: usize = 8;

thread_local! {
    static BF16_GEMMS: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the CPU's GEMMs on this thread run in bf16 (`on`) or f32 (`!on`); dropping it
/// (also on unwinding) restores the previous choice. A network set to bf16 on the CPU holds one
/// over its forward pass; its layers ask [`active`] when they multiply. Not `Send`: the choice
/// belongs to the thread that made it.
#[must_use = "the choice lasts only while the scope is held"]
pub struct Scope {
    previous: bool,
    _this_thread: std::marker::PhantomData<*const ()>,
}

/// Enters a [`Scope`].
pub fn scope(on: bool) -> Scope {
    Scope {
        previous: BF16_GEMMS.with(|c| c.replace(on)),
        _this_thread: std::marker::PhantomData,
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        BF16_GEMMS.with(|c| c.set(self.previous));
    }
}

/// `f()` inside a [`Scope`] of `on`: what a network set to bf16 does around its forward pass,
/// for hosts (and benchmarks) that call layers directly.
pub fn scoped<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let _scope = scope(on);
    f()
}

/// Whether GEMMs called on this thread multiply in bf16 (inside a [`Scope`] that said so).
pub fn active() -> bool {
    BF16_GEMMS.with(Cell::get)
}

/// Whether this CPU has AMX's bf16 tiles, the operating system lets this process use them, and
/// the current [`crate::KernelPolicy`] allows them (`SDSTREAM_NO_AMX` says no, for
/// comparisons). The hardware is asked once, and only once the policy allows it: a process that
/// never may use the tiles never requests them from the kernel.
pub fn amx_available() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::KernelPolicy::current().amx && *SUPPORTED.get_or_init(amx::request)
}

/// Whether this CPU has AVX512-BF16's `VDPBF16PS` (AMD Zen 4 and later, Intel Cooper Lake and
/// Sapphire Rapids): 32 bf16 products summed into 16 f32 lanes per instruction, twice the
/// multiply-adds of an f32 FMA, and the current [`crate::KernelPolicy`] allows it
/// (`SDSTREAM_NO_AVX512_BF16=1` says no, for comparisons).
pub fn avx512_bf16_available() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::KernelPolicy::current().avx512_bf16
        && *SUPPORTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            false
        })
}

/// The block kernels, fastest first; [`Kernel::best`] is the one the GEMMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`TDPBF16PS`).
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`).
    Avx512Bf16,
    /// The portable block: f32 multiplies of the rounded operands, in AVX2 where the CPU has
    /// it. No faster than the f32 GEMM.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU has that the current [`crate::KernelPolicy`] allows. Read
    /// once per GEMM by its caller and passed down to the GEMM's parts.
    pub fn best() -> Kernel {
        if amx_available() {
            Kernel::Amx
        } else if avx512_bf16_available() {
            Kernel::Avx512Bf16
        } else {
            Kernel::Portable
        }
    }

    /// Every kernel this CPU can run that the current [`crate::KernelPolicy`] allows (for tests
    /// and benchmarks).
    pub fn available() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        if amx_available() {
            kernels.push(Kernel::Amx);
        }
        if avx512_bf16_available() {
            kernels.push(Kernel::Avx512Bf16);
        }
        kernels.push(Kernel::Portable);
        kernels
    }

    /// Whether the CPU multiplies bf16 itself (AMX or AVX512-BF16), so that bf16 runs faster
    /// than f32.
    pub fn has_bf16_arithmetic(self) -> bool {
        self != Kernel::Portable
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as bits; NaN stays NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    // A select, not a branch, so that the packing loops vectorise.
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// `dst[i] = to_bf16(src[i])` (as long as `src`), 16 values an instruction where the CPU has
/// AVX-512: the packing loops' closures run in baseline code (the compiler does not inline
/// them into [`vectorised`]'s wrappers), and rounding there took a tenth of a bf16 UNet step
/// at 512² (perf).
#[inline(always)]
fn round_into(src: &[f32], dst: &mut [u16]) {
    let dst = &mut dst[..src.len()];
    #[cfg(target_arch = "x86_64")]
    if vectors() == Vectors::Avx512 {
        // SAFETY: the CPU has AVX-512F and BW; both slices are as long.
        unsafe { avx512_rounding::round_into(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = to_bf16(v);
    }
}

/// One row of a packed B block: for each of 16 columns, the pair (`even[c]`, `odd[c]`)
/// rounded, as [`round_into`] does.
#[inline(always)]
fn round_pairs_into(even: &[f32; TILE], odd: &[f32; TILE], dst: &mut [u16; K_BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if vectors() == Vectors::Avx512 {
        // SAFETY: the CPU has AVX-512F and BW.
        unsafe { avx512_rounding::round_pairs_into(even, odd, dst) };
        return;
    }
    for c in 0..TILE {
        dst[2 * c] = to_bf16(even[c]);
        dst[2 * c + 1] = to_bf16(odd[c]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_rounding;

#[inline(always)]
fn from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The widest vectors this CPU has that the bf16 kernels' portable loops are compiled for.
#[derive(Clone, Copy, PartialEq)]
enum Vectors {
    Avx512,
    Avx2,
    Baseline,
}

/// Decided once.
fn vectors() -> Vectors {
    static VECTORS: std::sync::OnceLock<Vectors> = std::sync::OnceLock::new();
    *VECTORS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
            {
                return Vectors::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Vectors::Avx2;
            }
        }
        Vectors::Baseline
    })
}

/// Runs `f` inside a function compiled for AVX-512 where the CPU has it, else for AVX2 where it
/// has that, else as it is, for the packing loops' rounding. Whether `f`'s body takes the wider
/// vectors is the compiler's choice (a closure too large to inline stays a call to baseline
/// code); the packing is bound by memory either way (gemm_bench's "packing" figures), and the
/// GEMM's own inner loops dispatch by name instead ([`panel_portable_vectorised`]).
#[inline(always)]
fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match vectors() {
            // SAFETY: the CPU has the features the function is compiled for.
            Vectors::Avx512 => return unsafe { avx512(f) },
            // SAFETY: as above.
            Vectors::Avx2 => return unsafe { avx2(f) },
            Vectors::Baseline => {}
        }
    }
    f()
}

/// Runs `pack(first_strip, strips_data)` over groups of consecutive strips of `data` (each
/// `strip_len` long), one group per thread on up to `threads` threads, [`vectorised`].
fn pack_strips<F: Fn(usize, &mut [u16]) + Sync>(
    data: &mut [u16],
    strip_len: usize,
    threads: usize,
    pack: F,
) {
    let run = |first: usize, group: &mut [u16]| vectorised(|| pack(first, group));
    let strips = data.len() / strip_len;
    let threads = threads.clamp(1, strips.max(1));
    if threads == 1 {
        run(0, data);
        return;
    }
    let per_thread = strips.div_ceil(threads);
    for_each_chunk(data, per_thread * strip_len, &|part, group| {
        run(part * per_thread, group)
    });
}

/// `src` rounded into `dst` (as far as both go).
pub fn round_slice(src: &[f32], dst: &mut [u16]) {
    let len = src.len().min(dst.len());
    round_into(&src[..len], &mut dst[..len]);
}

/// The left operand `A` (`m×k`) in bf16 tile blocks: strip `t` (rows `16t..16t+16`) holds its
/// `k` blocks one after another, each 16 rows × 32 values. Rows and `k` past the matrix are
/// zero; the strip count is even, so that every 32-row panel is whole.
#[derive(Debug, Clone, Default)]
pub struct PackedA {
    m: usize,
    k: usize,
    k_blocks: usize,
    data: Vec<u16>,
}

impl PackedA {
    /// Bytes this packing holds.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// Packs `src`, `m` rows of `k` values with row stride `ld`.
    pub fn new(src: &[f32], m: usize, k: usize, ld: usize) -> Self {
        let mut packed = Self::default();
        packed.repack(src, m, k, ld, 1);
        packed
    }

    /// Packs `src` into this buffer (grown, never shrunk, so a kept one stops allocating), on
    /// up to `threads` threads.
    pub fn repack(&mut self, src: &[f32], m: usize, k: usize, ld: usize, threads: usize) {
        let k_blocks = k.div_ceil(K_BLOCK);
        let strips = m.div_ceil(PANEL) * 2;
        let len = strips * k_blocks * BLOCK_LEN;
        (self.m, self.k, self.k_blocks) = (m, k, k_blocks);
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        if len == 0 {
            return;
        }
        let strip_len = k_blocks * BLOCK_LEN;
        pack_strips(&mut self.data[..len], strip_len, threads, |first, group| {
            for (j, data) in group.chunks_exact_mut(strip_len).enumerate() {
                let strip = first + j;
                for i in 0..TILE {
                    let row = strip * TILE + i;
                    for (q, block) in data.chunks_exact_mut(BLOCK_LEN).enumerate() {
                        let dst = &mut block[i * K_BLOCK..][..K_BLOCK];
                        let k0 = q * K_BLOCK;
                        let width = K_BLOCK.min(k - k0);
                        if row < m {
                            round_into(&src[row * ld + k0..][..width], dst);
                            dst[width..].fill(0);
                        } else {
                            dst.fill(0);
                        }
                    }
                }
            }
        });
    }

    /// The first tile block of strip `strip` at `k` block `q`.
    fn block(&self, strip: usize, q: usize) -> *const u16 {
        self.data[(strip * self.k_blocks + q) * BLOCK_LEN..].as_ptr()
    }
}

/// The right operand `B` (`k×n`) in bf16 tile blocks: strip `s` (columns `16s..16s+16`) holds
/// its `k` blocks one after another, each 16 rows of (for each of 16 columns) a pair of
/// consecutive `k`. Columns and `k` past the matrix are zero; the strip count is even.
#[derive(Debug, Clone, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    k_blocks: usize,
    data: Vec<u16>,
}

impl PackedB {
    fn reshape(&mut self, k: usize, n: usize) -> &mut [u16] {
        let k_blocks = k.div_ceil(K_BLOCK);
        let strips = n.div_ceil(PANEL) * 2;
        let len = strips * k_blocks * BLOCK_LEN;
        (self.k, self.n, self.k_blocks) = (k, n, k_blocks);
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }

    /// Packs `B` given as its transpose: `bt` holds `n` rows of `k` values (row stride `ld`),
    /// as a linear layer's weight `[out, in]` or attention's keys `[tokens, d]`; on up to
    /// `threads` threads.
    pub fn from_transposed(bt: &[f32], n: usize, k: usize, ld: usize, threads: usize) -> Self {
        let mut packed = Self::default();
        packed.repack_transposed(bt, n, k, ld, threads);
        packed
    }

    /// [`from_transposed`](Self::from_transposed) into this buffer (grown, never shrunk).
    pub fn repack_transposed(&mut self, bt: &[f32], n: usize, k: usize, ld: usize, threads: usize) {
        let k_blocks = k.div_ceil(K_BLOCK);
        let data = self.reshape(k, n);
        if data.is_empty() {
            return;
        }
        let strip_len = k_blocks * BLOCK_LEN;
        pack_strips(data, strip_len, threads, |first, group| {
            for (j, strip_data) in group.chunks_exact_mut(strip_len).enumerate() {
                let strip = first + j;
                for c in 0..TILE {
                    let col = strip * TILE + c;
                    for (q, block) in strip_data.chunks_exact_mut(BLOCK_LEN).enumerate() {
                        let k0 = q * K_BLOCK;
                        let width = K_BLOCK.min(k - k0);
                        let mut rounded = [0u16; K_BLOCK];
                        if col < n {
                            for (d, &v) in rounded.iter_mut().zip(&bt[col * ld + k0..][..width]) {
                                *d = to_bf16(v);
                            }
                        }
                        for r in 0..TILE {
                            block[r * K_BLOCK + 2 * c] = rounded[2 * r];
                            block[r * K_BLOCK + 2 * c + 1] = rounded[2 * r + 1];
                        }
                    }
                }
            }
        });
    }

    /// Packs `B` given row by row: `src` holds `k` rows of `n` values (row stride `ld`), as an
    /// im2col block `[C_in·kh·kw, positions]` or attention's values `[tokens, d]`. Reuses this
    /// buffer (grown, never shrunk); packs on up to `threads` threads.
    pub fn repack_rows(&mut self, src: &[f32], k: usize, n: usize, ld: usize, threads: usize) {
        let k_blocks = k.div_ceil(K_BLOCK);
        let data = self.reshape(k, n);
        if data.is_empty() {
            return;
        }
        let strip_len = k_blocks * BLOCK_LEN;
        // k blocks outermost: each reads 32 rows of the group's columns (in cache) and writes
        // one 1 KiB block per strip; strips outermost would read every row of the matrix for
        // each 16 columns.
        pack_strips(data, strip_len, threads, |first, group| {
            let strips = group.len() / strip_len;
            for q in 0..k_blocks {
                for j in 0..strips {
                    let c0 = (first + j) * TILE;
                    let width = TILE.min(n.saturating_sub(c0));
                    let block = &mut group[j * strip_len + q * BLOCK_LEN..][..BLOCK_LEN];
                    // Row `r` of B, columns c0..c0 + 16 (zeros past the matrix). A whole
                    // strip is a fixed-size copy that stays in registers; a partial one calls
                    // `memcpy` (which for whole strips took most of the packing's time).
                    let row = |r: usize| -> [f32; TILE] {
                        if r >= k || width == 0 {
                            return [0.0; TILE];
                        }
                        if width == TILE {
                            return src[r * ld + c0..][..TILE]
                                .try_into()
                                .expect("a whole strip");
                        }
                        let mut values = [0f32; TILE];
                        values[..width].copy_from_slice(&src[r * ld + c0..][..width]);
                        values
                    };
                    for (pair, dst) in block.chunks_exact_mut(K_BLOCK).enumerate() {
                        let k_even = q * K_BLOCK + 2 * pair;
                        let (even, odd) = (row(k_even), row(k_even + 1));
                        round_pairs_into(&even, &odd, dst.try_into().expect("a block row"));
                    }
                }
            }
        });
    }

    fn block(&self, strip: usize, q: usize) -> *const u16 {
        self.data[(strip * self.k_blocks + q) * BLOCK_LEN..].as_ptr()
    }
}

/// `C = A·B` into `c` (A's rows of B's columns, row stride `ldc`), over up to
/// `threads` threads. Errors when the operands' `k` differ or `c` is too short.
pub fn gemm(
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) -> candle_core::Result<()> {
    gemm_with(Kernel::best(), a, b, c, ldc, threads)
}

/// [`gemm`] with `kernel` (one of [`Kernel::available`]).
fn gemm_with(
    kernel: Kernel,
    a: &PackedA,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) -> candle_core::Result<()> {
    let (m, n) = (a.m, b.n);
    if a.k != b.k {
        candle_core::bail!("bf16 gemm: A has {} columns, B {} rows", a.k, b.k);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if ldc < n || c.len() < (m - 1) * ldc + n {
        candle_core::bail!(
            "bf16 gemm: output of {} values for {m}×{n} (row stride {ldc})",
            c.len()
        );
    }
    // SAFETY: checked just above.
    unsafe { gemm_raw(kernel, a, b, c.as_mut_ptr(), ldc, threads) };
    Ok(())
}

/// [`gemm`] into raw memory, for callers whose threads write disjoint blocks of one output.
///
/// # Safety
/// A's `k` is B's; `c` addresses A's rows of B's columns of writable values at stride
/// `ldc` (at least B's columns), which nothing else reads or writes during the call.
pub unsafe fn gemm_into(a: &PackedA, b: &PackedB, c: *mut f32, ldc: usize, threads: usize) {
    // SAFETY: as the caller promises.
    unsafe { gemm_raw(Kernel::best(), a, b, c, ldc, threads) }
}

/// # Safety
/// As [`gemm_into`].
unsafe fn gemm_raw(
    kernel: Kernel,
    a: &PackedA,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    threads: usize,
) {
    let (m, n) = (a.m, b.n);
    debug_assert_eq!(a.k, b.k);
    if m == 0 || n == 0 {
        return;
    }
    let (m_panels, n_panels) = (m.div_ceil(PANEL), n.div_ceil(PANEL));
    let threads = threads.clamp(1, m_panels.max(n_panels));
    let c_ptr = SharedMut(c);
    // Threads take rows of C when there are enough of them, else columns.
    let split_rows = m_panels >= threads * 2 || m_panels >= n_panels;
    let work = |range: std::ops::Range<usize>| {
        let (rows, cols) = if split_rows {
            (range, 0..n_panels)
        } else {
            (0..m_panels, range)
        };
        let _tiles = (kernel == Kernel::Amx).then(amx::Tiles::configure);
        let mut scratch = [0f32; PANEL * PANEL];
        for q0 in (0..a.k_blocks).step_by(K_BLOCKS_PER_PASS) {
            let blocks = K_BLOCKS_PER_PASS.min(a.k_blocks - q0);
            let accumulate = q0 > 0;
            for np0 in cols.clone().step_by(N_PANELS_PER_PASS) {
                let np1 = (np0 + N_PANELS_PER_PASS).min(cols.end);
                for mp in rows.clone() {
                    for np in np0..np1 {
                        let (r0, c0) = (mp * PANEL, np * PANEL);
                        let (h, w) = (PANEL.min(m - r0), PANEL.min(n - c0));
                        let operands = Operands {
                            a0: a.block(2 * mp, q0),
                            a1: a.block(2 * mp + 1, q0),
                            a_row: K_BLOCK,
                            a_step: BLOCK_LEN,
                            b0: b.block(2 * np, q0),
                            b1: b.block(2 * np + 1, q0),
                            blocks,
                        };
                        // SAFETY: the block of C at (r0, c0) lies inside `c` (checked above)
                        // and belongs to this thread alone (threads split panels); the packed
                        // operands hold `blocks` k blocks past each pointer.
                        unsafe {
                            let at = c_ptr.ptr().add(r0 * ldc + c0);
                            block_of_c(
                                kernel,
                                &operands,
                                at,
                                (h, w),
                                ldc,
                                accumulate,
                                &mut scratch,
                            );
                        }
                    }
                }
            }
        }
    };
    let items = if split_rows { m_panels } else { n_panels };
    for_each_range(items, threads, &work);
}

/// A linear layer's weight `[out, in]` packed for [`linear`], once per layer on first use.
#[derive(Debug, Clone, Default)]
pub struct LazyWeight(std::sync::Arc<std::sync::OnceLock<PackedB>>);

impl LazyWeight {
    fn get(&self, weight: &Tensor) -> candle_core::Result<&PackedB> {
        if let Some(packed) = self.0.get() {
            return Ok(packed);
        }
        let (n, k) = weight.dims2()?;
        let threads = super::threads();
        let packed = if weight.t()?.is_contiguous() {
            // Values laid out [in, out] (unet_blocks::Linear keeps them so on the CPU): B row
            // by row, read in place.
            with_f32_values(&weight.t()?, |values| {
                let mut packed = PackedB::default();
                packed.repack_rows(values, k, n, n, threads);
                packed
            })?
        } else {
            with_f32_values(weight, |values| {
                PackedB::from_transposed(values, n, k, k, threads)
            })?
        };
        Ok(self.0.get_or_init(|| packed))
    }
}

/// Runs `f` over the values of `t` as f32 (in place when `t` is a contiguous f32 CPU tensor,
/// else from a converted copy).
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("bf16 gemm: operand is not on the CPU");
    };
    let values = super::contiguous_slice::<f32>(cpu, layout, "bf16 gemm")?;
    Ok(f(values))
}

thread_local! {
    /// The activations of this thread's last bf16 product, packed (kept to reuse the buffer).
    static PACKED_ACTIVATIONS: std::cell::RefCell<PackedA> =
        std::cell::RefCell::new(PackedA::default());
}

/// `x·Wᵀ` for `x` `[.., in]` (f32 on the CPU) and `weight` `[out, in]`, in bf16 with f32 sums:
/// `[.., out]` in f32. `packed` keeps the weight's packing between calls.
pub fn linear(x: &Tensor, weight: &Tensor, packed: &LazyWeight) -> candle_core::Result<Tensor> {
    let packed_weight = packed.get(weight)?;
    let dims = x.dims().to_vec();
    let Some((&k, outer)) = dims.split_last() else {
        candle_core::bail!("bf16 linear: a scalar input");
    };
    if k != packed_weight.k {
        candle_core::bail!(
            "bf16 linear: input width {k}, weight expects {}",
            packed_weight.k
        );
    }
    let n = packed_weight.n;
    let m: usize = outer.iter().product();
    let threads = super::threads();
    let mut out = super::zeroed_buffer::<f32>(m * n);
    with_f32_values(x, |values| {
        PACKED_ACTIVATIONS.with(|packed_x| {
            let mut packed_x = packed_x.borrow_mut();
            packed_x.repack(values, m, k, k, threads);
            gemm(&packed_x, packed_weight, &mut out, n, threads)
        })
    })??;
    let mut shape = outer.to_vec();
    shape.push(n);
    Tensor::from_vec(out, shape, x.device())
}

/// `C (+)= A·B` for A's rows read in place: row `i` is the `b.k` consecutive bf16 values at
/// `a + i·a_row` (`b.k` a multiple of 32), `m` rows; on this thread. For maps kept in bf16
/// whose GEMM rows are windows of the map (the channels-last convolution), which need no
/// packing at all. Rows of a last, partial panel are copied into a zero-padded scratch, so
/// nothing past row `m − 1`'s values is read.
///
/// # Safety
/// Rows `0..m` of `a` are readable as described; `c` addresses `m` rows of B's columns of
/// writable values at stride `ldc`, which nothing else touches during the call.
pub unsafe fn gemm_rows_in_place(
    a: *const u16,
    a_row: usize,
    m: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (k, n) = (b.k, b.n);
    debug_assert!(k.is_multiple_of(K_BLOCK));
    if m == 0 || n == 0 {
        return;
    }
    let kernel = Kernel::best();
    let _tiles = (kernel == Kernel::Amx).then(amx::Tiles::configure);
    let mut scratch = [0f32; PANEL * PANEL];
    let mut tail = Vec::new();
    for r0 in (0..m).step_by(PANEL) {
        let h = PANEL.min(m - r0);
        let (rows, row_stride) = if h == PANEL {
            // SAFETY: row r0 is one of the caller's rows.
            (unsafe { a.add(r0 * a_row) }, a_row)
        } else {
            tail.clear();
            tail.resize(PANEL * k, 0u16);
            for i in 0..h {
                // SAFETY: rows r0..m are readable, k values each.
                let row = unsafe { std::slice::from_raw_parts(a.add((r0 + i) * a_row), k) };
                tail[i * k..(i + 1) * k].copy_from_slice(row);
            }
            (tail.as_ptr(), k)
        };
        for np in 0..n.div_ceil(PANEL) {
            let c0 = np * PANEL;
            let operands = Operands {
                a0: rows,
                // SAFETY: 16 rows further, inside the 32 rows just chosen.
                a1: unsafe { rows.add(TILE * row_stride) },
                a_row: row_stride,
                a_step: K_BLOCK,
                b0: b.block(2 * np, 0),
                b1: b.block(2 * np + 1, 0),
                blocks: b.k_blocks,
            };
            // SAFETY: the caller promises the rows of A and the block of C.
            unsafe {
                block_of_c(
                    kernel,
                    &operands,
                    c.add(r0 * ldc + c0),
                    (h, PANEL.min(n - c0)),
                    ldc,
                    accumulate,
                    &mut scratch,
                );
            }
        }
    }
}

/// One 32×32 block of C at `c`, of which the first `h` rows and `w` columns exist: written in
/// place when whole, else through `scratch`.
///
/// # Safety
/// As [`panel`], for `h` rows of `w` values at `c`.
unsafe fn block_of_c(
    kernel: Kernel,
    operands: &Operands,
    c: *mut f32,
    (h, w): (usize, usize),
    ldc: usize,
    accumulate: bool,
    scratch: &mut [f32; PANEL * PANEL],
) {
    // SAFETY: as the caller promises.
    unsafe {
        if h == PANEL && w == PANEL {
            panel(kernel, operands, c, ldc, accumulate);
            return;
        }
        for i in 0..h {
            for j in 0..w {
                scratch[i * PANEL + j] = if accumulate { *c.add(i * ldc + j) } else { 0.0 };
            }
        }
        panel(kernel, operands, scratch.as_mut_ptr(), PANEL, accumulate);
        for i in 0..h {
            for j in 0..w {
                *c.add(i * ldc + j) = scratch[i * PANEL + j];
            }
        }
    }
}

/// The packed operands of one 32×32 block of C: two 16-row strips of A and two 16-column
/// strips of B, each pointing at its first k block of the pass.
struct Operands {
    a0: *const u16,
    a1: *const u16,
    /// Elements from one row of A to the next (32 when packed).
    a_row: usize,
    /// Elements from one k block of A to the next (a whole block when packed, 32 in place).
    a_step: usize,
    b0: *const u16,
    b1: *const u16,
    blocks: usize,
}

/// One 32×32 block of C at `c` (row stride `ldc` values): `C (+)= A·B` over the operands' k
/// blocks.
///
/// # Safety
/// `c` addresses 32 rows of 32 writable values at stride `ldc`; the operands hold `blocks`
/// tile blocks past each pointer; `kernel` is one of [`Kernel::available`], and for AMX this
/// thread's tiles are configured.
unsafe fn panel(kernel: Kernel, ops: &Operands, c: *mut f32, ldc: usize, accumulate: bool) {
    match kernel {
        // SAFETY: as the caller promises.
        Kernel::Amx => unsafe { amx::panel(ops, c, ldc, accumulate) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises; the CPU has AVX512-BF16.
        Kernel::Avx512Bf16 => unsafe { avx512_bf16::panel(ops, c, ldc, accumulate) },
        // SAFETY: as the caller promises.
        _ => unsafe { panel_portable_vectorised(ops, c, ldc, accumulate) },
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_bf16;

/// Rows of C the portable block carries through the whole pass at a time, against one 16-column
/// strip of B: 4 × 16 sums, eight 8-lane vectors on AVX2.
const PORTABLE_ROWS: usize = 4;

/// The portable block: the same rounded operands, each pair of products summed in f32 and then
/// added to the running sum, `c += a₀·b₀ + a₁·b₁`, pair after pair in `k` order (as the tiles
/// pair them). Written so that the compiler vectorises it over the 16 columns of a strip of B
/// (run through [`vectorised`]: AVX2 or AVX-512 where the CPU has them); every compilation gives
/// the same sums bit for bit, since nothing is reordered or fused.
/// `rows_times_strip` computes each 4-row × 16-column piece: [`rows_times_strip`] or its AVX2
/// twin ([`avx2::rows_times_strip`]), which give the same sums.
#[inline(always)]
unsafe fn panel_portable(
    ops: &Operands,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    rows_times_strip: impl Fn(&[&[u16]; PORTABLE_ROWS], usize, &[u16], usize) -> Sums,
) {
    let a_len = (TILE - 1) * ops.a_row + ops.blocks.saturating_sub(1) * ops.a_step + K_BLOCK;
    for (strip, b) in [ops.b0, ops.b1].into_iter().enumerate() {
        // SAFETY: the caller promises `blocks` tile blocks past each operand pointer (for A: 16
        // rows `a_row` apart, k blocks `a_step` apart).
        let b = unsafe { std::slice::from_raw_parts(b, ops.blocks * BLOCK_LEN) };
        for r0 in (0..PANEL).step_by(PORTABLE_ROWS) {
            let a = if r0 < TILE { ops.a0 } else { ops.a1 };
            let rows: [&[u16]; PORTABLE_ROWS] = std::array::from_fn(|i| {
                // SAFETY: as above; the strip's row (r0 + i) mod 16 starts its slice.
                unsafe {
                    std::slice::from_raw_parts(
                        a.add(((r0 + i) % TILE) * ops.a_row),
                        a_len - (TILE - 1) * ops.a_row,
                    )
                }
            });
            let sums = rows_times_strip(&rows, ops.a_step, b, ops.blocks);
            for (i, row) in sums.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    // SAFETY: the caller promises 32×32 writable values at stride `ldc`.
                    unsafe {
                        let at = c.add((r0 + i) * ldc + strip * TILE + j);
                        *at = if accumulate { *at + v } else { v };
                    }
                }
            }
        }
    }
}

/// [`panel_portable`] with the AVX2 piece where the CPU has AVX2 (AVX-512 CPUs included), else
/// the plain one.
///
/// # Safety
/// As [`panel`].
unsafe fn panel_portable_vectorised(ops: &Operands, c: *mut f32, ldc: usize, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    if vectors() != Vectors::Baseline {
        // SAFETY: as the caller promises; the CPU has AVX2.
        return unsafe {
            panel_portable(ops, c, ldc, accumulate, |rows, a_step, b, blocks| {
                avx2::rows_times_strip(rows, a_step, b, blocks)
            })
        };
    }
    // SAFETY: as the caller promises.
    unsafe { panel_portable(ops, c, ldc, accumulate, rows_times_strip) }
}

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The sums of [`PORTABLE_ROWS`] rows of C over one 16-column strip.
type Sums = [[f32; TILE]; PORTABLE_ROWS];

/// `PORTABLE_ROWS` rows of A (each `blocks` k blocks `a_step` apart) times one 16-column strip
/// of packed B, summed pairwise as [`panel_portable`] says.
fn rows_times_strip(
    rows: &[&[u16]; PORTABLE_ROWS],
    a_step: usize,
    b: &[u16],
    blocks: usize,
) -> Sums {
    let mut sums = [[0f32; TILE]; PORTABLE_ROWS];
    for q in 0..blocks {
        for (pair, b_pairs) in b[q * BLOCK_LEN..][..BLOCK_LEN]
            .chunks_exact(K_BLOCK)
            .enumerate()
        {
            // The strip's 16 columns at k = 2·pair (the first of each pair) and 2·pair + 1.
            let mut b_even = [0f32; TILE];
            let mut b_odd = [0f32; TILE];
            for (j, two) in b_pairs.chunks_exact(2).enumerate() {
                b_even[j] = from_bf16(two[0]);
                b_odd[j] = from_bf16(two[1]);
            }
            for (row_sums, row) in sums.iter_mut().zip(rows) {
                let at = q * a_step + 2 * pair;
                let (a_even, a_odd) = (from_bf16(row[at]), from_bf16(row[at + 1]));
                for ((sum, &even), &odd) in row_sums.iter_mut().zip(&b_even).zip(&b_odd) {
                    *sum += a_even * even + a_odd * odd;
                }
            }
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
mod amx;

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use super::Operands;

    pub(super) fn request() -> bool {
        false
    }

    pub(super) struct Tiles(());

    impl Tiles {
        pub(super) fn configure() -> Self {
            Self(())
        }
    }

    pub(super) unsafe fn panel(_: &Operands, _: *mut f32, _: usize, _: bool) {
        unreachable!("AMX is x86-64 only")
    }
}

#[cfg(test)]
mod tests;
