//! The StreamDiffusion state machine.
