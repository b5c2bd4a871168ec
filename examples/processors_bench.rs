//! Milliseconds per frame of each image processor. The benchmark itself is
//! examples/support/processors.rs (also `bench processors`); its flags are described there.

use std::process::ExitCode;

#[path = "support/processors.rs"]
mod processors;
#[path = "support/mod.rs"]
mod support;

fn main() -> ExitCode {
    processors::main(std::env::args().skip(1).collect())
}
