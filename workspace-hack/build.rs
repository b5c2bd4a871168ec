// A build script, so that cargo resolves the [build-dependencies] that unify the proc macros'
// and build scripts' features.
fn main() {}
