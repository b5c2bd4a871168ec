//! The StreamDiffusionParams contract (Daydream's model), engine settings, and update classification.
