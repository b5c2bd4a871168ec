//! `include/sdstream.h` is what cbindgen (pinned in Cargo.toml, configured by cbindgen.toml)
//! generates from this crate; fails with the command to regenerate it when it is stale.

use std::path::Path;

#[test]
fn header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = crate_dir.join("../include/sdstream.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("ffi/cbindgen.toml: {e}"));
    // Parsed from the sources alone (no `cargo metadata`), so the check runs offline.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen: {e}"));
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("cbindgen writes UTF-8");

    if std::env::var_os("SDS_UPDATE_HEADER").is_some() {
        std::fs::create_dir_all(header_path.parent().expect("include/")).expect("create include/");
        std::fs::write(&header_path, &generated)
            .unwrap_or_else(|e| panic!("{}: {e}", header_path.display()));
        return;
    }
    let committed = std::fs::read_to_string(&header_path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/sdstream.h is stale (or missing); regenerate it with\n    \
         SDS_UPDATE_HEADER=1 cargo test -p sdstream-ffi --test header\nand commit it"
    );
}
