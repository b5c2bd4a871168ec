//! The numbers every stream draws from, below both the networks and the pipeline: torch's CPU
//! random generator reproduced bit for bit, and the LCM scheduler grid. A leaf: it depends on
//! nothing else in the crate but the error type.

pub mod rng;
pub mod scheduler;
