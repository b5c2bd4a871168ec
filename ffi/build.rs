//! Gives the shared library a versioned soname on Linux (`libsdstream.so.0.1` for 0.1.x, as
//! cargo-c names a 0.x library: minor versions may break the ABI; `libsdstream.so.N` from 1.0),
//! so that scripts/install-c.sh installs it the way C and C++ hosts expect
//! (`libsdstream.so` → `libsdstream.so.0.1` → `libsdstream.so.0.1.0`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return;
    }
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_default();
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_default();
    let soname_version = if major == "0" {
        format!("0.{minor}")
    } else {
        major
    };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsdstream.so.{soname_version}");
}
