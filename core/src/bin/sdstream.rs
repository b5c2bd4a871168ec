//! `sdstream`: the Daydream-compatible server (`sdstream serve`) and the replay of a recorded
//! stream (`sdstream replay`). Everything is in the library's `server` module.

fn main() -> std::process::ExitCode {
    sdstream::server::main(std::env::args().skip(1).collect())
}
