//! `sdstream`: the Daydream-compatible server (`sdstream serve`) and the replay of a recorded
//! stream (`sdstream replay`). Everything is in the library's `api` module.

/// Large freed blocks are kept for reuse: a frame allocates the same large buffers every time
/// (sdstream::alloc).
#[global_allocator]
static ALLOCATOR: sdstream::alloc::ReusingAllocator = sdstream::alloc::ReusingAllocator::new();

fn main() -> std::process::ExitCode {
    sdstream_server::api::main(std::env::args().skip(1).collect())
}
