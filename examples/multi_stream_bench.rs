//! Many streams on one machine: N streams batched across streams against one engine per
//! stream. The benchmark itself is examples/support/multi_stream.rs (also `bench multi-stream`);
//! its flags are described there.

use std::process::ExitCode;

#[path = "support/multi_stream.rs"]
mod multi_stream;

// As the C ABI, the Python module and the server have it (sdstream::alloc).
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

fn main() -> ExitCode {
    multi_stream::main(std::env::args().skip(1).collect())
}
