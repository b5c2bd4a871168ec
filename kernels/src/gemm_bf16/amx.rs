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
