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
mod avx512_rounding {
    //! [`super::to_bf16`] on 16 lanes at once, the same integer arithmetic lane by lane, so
    //! the packed bits equal the scalar loop's.

    use std::arch::x86_64::*;

    use super::{K_BLOCK, TILE};

    /// The rounded bits of 16 f32 values, each in the low half of its 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn rounded(bits: __m512i) -> __m512i {
        let high = _mm512_srli_epi32::<16>(bits);
        let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
        let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
        let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
        _mm512_mask_blend_epi32(nan, rounded, quiet_nan)
    }

    /// # Safety
    /// The CPU has AVX-512F and BW; `dst` is as long as `src`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn round_into(src: &[f32], dst: &mut [u16]) {
        let whole = src.len() / 16 * 16;
        for at in (0..whole).step_by(16) {
            // SAFETY: 16 values at `at` lie inside both slices (at + 16 ≤ whole).
            unsafe {
                let bits = _mm512_loadu_si512(src.as_ptr().add(at).cast());
                let words = _mm512_cvtepi32_epi16(rounded(bits));
                _mm256_storeu_si256(dst.as_mut_ptr().add(at).cast(), words);
            }
        }
        for (d, &v) in dst[whole..].iter_mut().zip(&src[whole..]) {
            *d = super::to_bf16(v);
        }
    }

    /// # Safety
    /// The CPU has AVX-512F and BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn round_pairs_into(
        even: &[f32; TILE],
        odd: &[f32; TILE],
        dst: &mut [u16; K_BLOCK],
    ) {
        // SAFETY: 16 values each, and 32 for `dst`: whole vectors.
        unsafe {
            let even = rounded(_mm512_loadu_si512(even.as_ptr().cast()));
            let odd = rounded(_mm512_loadu_si512(odd.as_ptr().cast()));
            // Little-endian: the even value in each 32-bit lane's low half, as the pair layout.
            let pairs = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
            _mm512_storeu_si512(dst.as_mut_ptr().cast(), pairs);
        }
    }
}

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
mod avx512_bf16 {
    //! The AVX512-BF16 block: `VDPBF16PS` adds to each of 16 f32 lanes the two products of a
    //! pair of bf16 values, exactly the pair layout of a packed B row (16 columns × a pair of
    //! consecutive `k`); A's pair for one row of C is broadcast to every lane. Eight rows of C
    //! × two 16-column strips stay in 16 of the 32 vector registers through a pass over `k`.
    //! Each instruction rounds after each product (the odd one first), with denormals read
    //! and written as zero, so its sums differ from the portable block's in the last bits.

    use std::arch::x86_64::*;

    use super::{BLOCK_LEN, K_BLOCK, Operands, PANEL, TILE};

    /// Rows of C per register block.
    const ROWS: usize = 8;
    /// K blocks ahead whose rows of A are prefetched.
    const AHEAD: usize = 4;

    /// [`super::panel`] on AVX512-BF16.
    ///
    /// # Safety
    /// As [`super::panel`]; the CPU has AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn panel(ops: &Operands, c: *mut f32, ldc: usize, accumulate: bool) {
        for r0 in (0..PANEL).step_by(ROWS) {
            let a = if r0 < TILE { ops.a0 } else { ops.a1 };
            let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
            if accumulate {
                for (i, row) in sums.iter_mut().enumerate() {
                    for (h, v) in row.iter_mut().enumerate() {
                        // SAFETY: 32 rows of 32 values at stride ldc (the caller's promise).
                        *v = unsafe { _mm512_loadu_ps(c.add((r0 + i) * ldc + h * TILE)) };
                    }
                }
            }
            for q in 0..ops.blocks {
                if q + AHEAD < ops.blocks {
                    for i in 0..ROWS {
                        let row = a
                            .wrapping_add(((r0 + i) % TILE) * ops.a_row + (q + AHEAD) * ops.a_step);
                        _mm_prefetch::<_MM_HINT_T0>(row.cast());
                    }
                }
                for pair in 0..TILE {
                    // SAFETY: the operands hold `blocks` tile blocks past each pointer: a B
                    // block is 16 rows of 32 values (one 64-byte vector each); A's rows are
                    // `a_row` apart, k blocks `a_step` apart, 32 values each.
                    unsafe {
                        let at = q * BLOCK_LEN + pair * K_BLOCK;
                        let b = [
                            _mm512_loadu_si512(ops.b0.add(at).cast()),
                            _mm512_loadu_si512(ops.b1.add(at).cast()),
                        ];
                        let b: [__m512bh; 2] = [
                            std::mem::transmute::<__m512i, __m512bh>(b[0]),
                            std::mem::transmute::<__m512i, __m512bh>(b[1]),
                        ];
                        for (i, row) in sums.iter_mut().enumerate() {
                            let word = a
                                .add(((r0 + i) % TILE) * ops.a_row + q * ops.a_step + 2 * pair)
                                .cast::<i32>()
                                .read_unaligned();
                            let a =
                                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word));
                            row[0] = _mm512_dpbf16_ps(row[0], a, b[0]);
                            row[1] = _mm512_dpbf16_ps(row[1], a, b[1]);
                        }
                    }
                }
            }
            for (i, row) in sums.iter().enumerate() {
                for (h, &v) in row.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe { _mm512_storeu_ps(c.add((r0 + i) * ldc + h * TILE), v) };
                }
            }
        }
    }
}

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
mod avx2 {
    //! The portable block's piece in AVX2 intrinsics: the compiler's own vectorisation of
    //! [`super::rows_times_strip`] shuffles the pairs apart and spills a sum (about 50 GFLOP/s
    //! on 2 Zen 3 cores where this reaches more; examples/gemm_bench).

    use std::arch::x86_64::*;

    use super::{BLOCK_LEN, K_BLOCK, PORTABLE_ROWS, Sums, TILE};

    /// [`super::rows_times_strip`], the same sums bit for bit: every pair of products is two
    /// multiplies and an add, then added to the row's sum, in `k` order; nothing fused.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_times_strip(
        rows: &[&[u16]; PORTABLE_ROWS],
        a_step: usize,
        b: &[u16],
        blocks: usize,
    ) -> Sums {
        // A pair (first value in the low half) widens to two f32 values: the first shifted up,
        // the second with the low half cleared.
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut sums = [[_mm256_setzero_ps(); 2]; PORTABLE_ROWS];
        let b = &b[..blocks * BLOCK_LEN];
        for r in rows {
            assert!(r.len() >= blocks.saturating_sub(1) * a_step + K_BLOCK);
        }
        for q in 0..blocks {
            for pair in 0..TILE {
                let b_at = q * BLOCK_LEN + pair * K_BLOCK;
                // SAFETY: b_at + 32 ≤ blocks × BLOCK_LEN = b.len(): two loads of 16 values.
                let (w0, w1) = unsafe {
                    let at = b.as_ptr().add(b_at).cast::<__m256i>();
                    (_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1)))
                };
                let b_even = [
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
                ];
                let b_odd = [
                    _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                    _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
                ];
                for (row_sums, row) in sums.iter_mut().zip(rows) {
                    // SAFETY: q·a_step + 2·pair + 2 ≤ (blocks − 1)·a_step + 32 ≤ row.len()
                    // (asserted above).
                    let word = unsafe {
                        row.as_ptr()
                            .add(q * a_step + 2 * pair)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    let a = _mm256_set1_epi32(word);
                    let a_even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a));
                    let a_odd = _mm256_castsi256_ps(_mm256_and_si256(a, high));
                    for h in 0..2 {
                        let pair_sum = _mm256_add_ps(
                            _mm256_mul_ps(a_even, b_even[h]),
                            _mm256_mul_ps(a_odd, b_odd[h]),
                        );
                        row_sums[h] = _mm256_add_ps(row_sums[h], pair_sum);
                    }
                }
            }
        }
        let mut out = [[0f32; TILE]; PORTABLE_ROWS];
        for (row_out, row_sums) in out.iter_mut().zip(&sums) {
            for (h, &v) in row_sums.iter().enumerate() {
                // SAFETY: 8 values from lane h·8 of a 16-value row.
                unsafe { _mm256_storeu_ps(row_out[h * 8..].as_mut_ptr(), v) };
            }
        }
        out
    }
}

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
mod amx {
    //! The AMX block: inline assembly, since Rust's AMX intrinsics are not stable.

    use std::arch::asm;

    use super::{BLOCK_LEN, Operands, TILE};

    /// Asks Linux for the tile data state (AMX's 8 KiB of registers are off until a process
    /// asks), after checking CPUID for AMX-TILE and AMX-BF16.
    pub(super) fn request() -> bool {
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU this builds for.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: the request only changes which register state the kernel saves for this
            // process; a refusal returns an error and changes nothing.
            let status = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            status == 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The palette every tile register is set to: 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
        reserved2: [u8; 16],
    }

    /// This thread's tiles, configured while the value lives and released when it drops (so
    /// the kernel stops saving 8 KiB of tile state at every switch).
    pub(super) struct Tiles(());

    impl Tiles {
        pub(super) fn configure() -> Self {
            let mut config = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                bytes_per_row: [0; 16],
                rows: [0; 16],
                reserved2: [0; 16],
            };
            for t in 0..8 {
                config.bytes_per_row[t] = 64;
                config.rows[t] = TILE as u8;
            }
            // SAFETY: only called where `amx_available` said the process may use the tiles;
            // the configuration is a valid palette-1 layout.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
            }
            Self(())
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releases what `configure` set up on this thread.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One 32×32 block: tmm0..tmm3 accumulate (rows 0–15 / 16–31 × columns 0–15 / 16–31),
    /// tmm4/tmm5 hold A's strips and tmm6/tmm7 B's.
    ///
    /// # Safety
    /// As [`super::panel`]; this thread's tiles are configured ([`Tiles::configure`]).
    pub(super) unsafe fn panel(ops: &Operands, c: *mut f32, ldc: usize, accumulate: bool) {
        let stride = ldc * 4;
        // SAFETY: the four C tiles are 16 rows of 64 bytes at `stride`, inside the block the
        // caller handed over; the operand loads read 1 KiB per block that the caller promises.
        unsafe {
            let c01 = c.add(TILE);
            let c10 = c.add(TILE * ldc);
            let c11 = c10.add(TILE);
            if accumulate {
                asm!(
                    "tileloadd tmm0, [{c00} + {s} * 1]",
                    "tileloadd tmm1, [{c01} + {s} * 1]",
                    "tileloadd tmm2, [{c10} + {s} * 1]",
                    "tileloadd tmm3, [{c11} + {s} * 1]",
                    c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                    s = in(reg) stride,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {s} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, {a_step}",
                "add {a1}, {a_step}",
                "add {b0}, {step}",
                "add {b1}, {step}",
                "dec {blocks}",
                "jnz 2b",
                a0 = inout(reg) ops.a0 => _,
                a1 = inout(reg) ops.a1 => _,
                b0 = inout(reg) ops.b0 => _,
                b1 = inout(reg) ops.b1 => _,
                blocks = inout(reg) ops.blocks => _,
                sa = in(reg) ops.a_row * 2,
                a_step = in(reg) ops.a_step * 2,
                s = in(reg) 64usize,
                step = const BLOCK_LEN * 2,
                options(nostack, readonly),
            );
            asm!(
                "tilestored [{c00} + {s} * 1], tmm0",
                "tilestored [{c01} + {s} * 1], tmm1",
                "tilestored [{c10} + {s} * 1], tmm2",
                "tilestored [{c11} + {s} * 1], tmm3",
                c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                s = in(reg) stride,
                options(nostack),
            );
        }
    }
}

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
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) with a spread of magnitudes.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rounded(x: f32) -> f64 {
        f64::from(from_bf16(to_bf16(x)))
    }

    /// The exact product of the rounded operands, in f64.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = rounded(a[i * k + p]);
                for j in 0..n {
                    c[i * n + j] += x * rounded(b[p * n + j]);
                }
            }
        }
        c
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to the even one, up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        for x in values(1000, 3) {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }

    /// The vector rounding (where the CPU has AVX-512) gives the scalar rounding's bits, at
    /// every length (whole vectors and a tail) and for the special values.
    #[test]
    fn slices_and_pairs_round_as_each_value_does() {
        let mut src = values(1000, 7);
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            f32::MAX,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::from_bits(0x7f7f_ffff),
            f32::from_bits(0x7f80_0001),
        ];
        src[..specials.len()].copy_from_slice(&specials);
        for len in [0, 5, 16, 31, 32, 1000] {
            let mut dst = vec![0u16; len];
            round_slice(&src[..len], &mut dst);
            for (i, (&d, &x)) in dst.iter().zip(&src).enumerate() {
                assert_eq!(d, to_bf16(x), "value {i} ({x}) of {len}");
            }
        }
        let even: [f32; TILE] = src[..TILE].try_into().unwrap();
        let odd: [f32; TILE] = src[TILE..2 * TILE].try_into().unwrap();
        let mut pairs = [0u16; K_BLOCK];
        round_pairs_into(&even, &odd, &mut pairs);
        for c in 0..TILE {
            assert_eq!(
                [pairs[2 * c], pairs[2 * c + 1]],
                [to_bf16(even[c]), to_bf16(odd[c])]
            );
        }
    }

    /// Both packings of B and both kernels against the f64 product of the rounded operands,
    /// at shapes with ragged edges in every dimension and more than one pass over k.
    #[test]
    fn gemm_matches_the_rounded_product() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (17, 33, 15),
            (64, 1100, 96),
            (45, 2083, 70),
            (96, 64, 33),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let expected = reference(&a, &b, m, k, n);
            let mut packed_a = PackedA::new(&a, m, k, k);
            packed_a.repack(&a, m, k, k, 3);
            let mut by_rows = PackedB::default();
            by_rows.repack_rows(&b, k, n, n, 2);
            let by_transpose = PackedB::from_transposed(&bt, n, k, k, 2);
            for packed_b in [&by_rows, &by_transpose] {
                for kernel in Kernel::available() {
                    for threads in [1, 3] {
                        let ldc = n + 3;
                        let mut c = vec![f32::NAN; m * ldc];
                        gemm_with(kernel, &packed_a, packed_b, &mut c, ldc, threads).unwrap();
                        let mut worst = 0f64;
                        for i in 0..m {
                            for j in 0..n {
                                let e = expected[i * n + j];
                                let d = (f64::from(c[i * ldc + j]) - e).abs();
                                // f32 sums of k products: error ~ k·2⁻²⁴ of the magnitudes.
                                worst = worst.max(d / (k as f64).sqrt());
                            }
                            // The padding between rows is never written.
                            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                        }
                        assert!(
                            worst < 2e-6,
                            "{m}×{k}×{n} {kernel:?} threads {threads}: {worst}"
                        );
                    }
                }
            }
        }
    }

    /// The portable block's pieces (plain, and AVX2 where the CPU has it) give the pairwise
    /// f32 formula's sums bit for bit: `c += a[2p]·b[2p] + a[2p+1]·b[2p+1]`, pair after pair,
    /// on top of what C held when accumulating.
    #[test]
    fn portable_block_sums_pairwise_bit_for_bit() {
        let (m, k, n) = (PANEL, 5 * K_BLOCK - 7, PANEL);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let packed_a = PackedA::new(&a, m, k, k);
        let mut packed_b = PackedB::default();
        packed_b.repack_rows(&b, k, n, n, 1);
        let ops = Operands {
            a0: packed_a.block(0, 0),
            a1: packed_a.block(1, 0),
            a_row: K_BLOCK,
            a_step: BLOCK_LEN,
            b0: packed_b.block(0, 0),
            b1: packed_b.block(1, 0),
            blocks: packed_a.k_blocks,
        };
        let start = values(m * n, 7);
        let value = |x: &[f32], at: usize, len: usize| {
            if at < len {
                from_bf16(to_bf16(x[at]))
            } else {
                0.0
            }
        };
        let mut expected = start.clone();
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0f32;
                for p in (0..packed_a.k_blocks * K_BLOCK).step_by(2) {
                    let (a0, a1) = (
                        value(&a, i * k + p, (i + 1) * k),
                        value(&a, i * k + p + 1, (i + 1) * k),
                    );
                    let (b0, b1) = (
                        if p < k {
                            value(&b, p * n + j, k * n)
                        } else {
                            0.0
                        },
                        if p + 1 < k {
                            value(&b, (p + 1) * n + j, k * n)
                        } else {
                            0.0
                        },
                    );
                    sum += a0 * b0 + a1 * b1;
                }
                expected[i * n + j] += sum;
            }
        }
        let mut pieces = vec!["plain"];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            pieces.push("avx2");
        }
        for &piece in &pieces {
            let mut c = start.clone();
            // SAFETY: c holds 32 rows of n = 32 values; the operands are whole packed blocks;
            // the AVX2 piece runs only where the CPU has AVX2.
            unsafe {
                if piece == "plain" {
                    panel_portable(&ops, c.as_mut_ptr(), n, true, rows_times_strip);
                } else {
                    #[cfg(target_arch = "x86_64")]
                    panel_portable(&ops, c.as_mut_ptr(), n, true, |r, step, b, q| {
                        avx2::rows_times_strip(r, step, b, q)
                    });
                }
            }
            let differing = c
                .iter()
                .zip(&expected)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differing,
                0,
                "{piece}: {differing} of {} sums differ",
                m * n
            );
        }
        println!("portable block pieces checked bit for bit: {pieces:?}");
    }

    /// The tensor entry point: `x·Wᵀ` over a batch of token rows equals candle's f32 matmul of
    /// the rounded operands, and the weight is packed once for every call.
    #[test]
    fn linear_matches_the_rounded_matmul() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 37, 70), &dev)?;
        let w = Tensor::randn(0f32, 0.2, (45, 70), &dev)?;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let want = round(&x)?.broadcast_matmul(&round(&w)?.t()?)?;
        // The weight laid out [out, in], and as a view of [in, out] values (unet_blocks::Linear
        // on the CPU), packed from either.
        let w_in_out = w.t()?.contiguous()?.t()?;
        for weight in [&w, &w_in_out] {
            let packed = LazyWeight::default();
            for _ in 0..2 {
                let got = linear(&x, weight, &packed)?;
                assert_eq!(got.dims(), &[2, 37, 45]);
                let err = (&got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(err < 1e-4, "{err}");
            }
            assert!(packed.0.get().is_some());
        }
        Ok(())
    }
}
