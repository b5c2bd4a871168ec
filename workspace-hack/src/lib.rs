//! No code: this package only unifies dependency features (see its Cargo.toml).
