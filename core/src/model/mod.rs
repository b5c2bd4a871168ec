//! Where model files come from and how networks are built from them.
