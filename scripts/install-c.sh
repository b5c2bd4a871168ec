#!/usr/bin/env bash
# Installs sdstream's C library where C and C++ hosts look for libraries (Linux):
#
#   bash scripts/install-c.sh [--debug] [--features cuda|cudnn] PREFIX
#
#   PREFIX/include/sdstream.h
#   PREFIX/lib/libsdstream.so.X.Y.Z, its soname link libsdstream.so.0.Y (0.x: a minor version
#       may change the ABI, as cargo-c names such libraries; from 1.0, libsdstream.so.X) and
#       the link-time libsdstream.so
#   PREFIX/lib/libsdstream.a
#   PREFIX/lib/pkgconfig/sdstream.pc        pkg-config --cflags --libs [--static] sdstream
#   PREFIX/lib/cmake/sdstream/              find_package(sdstream): sdstream::sdstream (shared),
#                                           sdstream::sdstream_static
#
# It builds sdstream-ffi first (release; --debug takes the dev profile, whose dependencies are
# optimised too, and reuses a test build). The files are the build's: nothing is compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
features=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --debug) profile=debug; shift ;;
    --features) features=(--features "$2"); shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "install-c.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -ne 1 ]]; then
  echo "usage: bash scripts/install-c.sh [--debug] [--features cuda|cudnn] PREFIX" >&2
  exit 2
fi
if [[ "$(uname -s)" != Linux ]]; then
  echo "install-c.sh installs the Linux layout (soname, .so links); on $(uname -s), link" \
    "target/release/libsdstream.* and include/sdstream.h directly" >&2
  exit 2
fi
mkdir -p "$1"
prefix="$(cd "$1" && pwd)"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
IFS=. read -r major minor _ <<< "$version"
if [[ "$major" == 0 ]]; then soversion="0.$minor"; else soversion="$major"; fi

cargo_args=(build -p sdstream-ffi "${features[@]}")
[[ "$profile" == release ]] && cargo_args+=(--release)
cargo "${cargo_args[@]}"
built="${CARGO_TARGET_DIR:-target}/$profile"
for file in libsdstream.so libsdstream.a; do
  [[ -f "$built/$file" ]] || { echo "install-c.sh: $built/$file was not built" >&2; exit 1; }
done
soname="$(readelf -d "$built/libsdstream.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
if [[ "$soname" != "libsdstream.so.$soversion" ]]; then
  echo "install-c.sh: the library's soname is '$soname', not libsdstream.so.$soversion (ffi/build.rs)" >&2
  exit 1
fi

# What a Rust static library needs from the system on Linux (rustc --print native-static-libs).
native="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/sdstream"
install -m 644 include/sdstream.h "$prefix/include/sdstream.h"
install -m 755 "$built/libsdstream.so" "$prefix/lib/libsdstream.so.$version"
ln -sfn "libsdstream.so.$version" "$prefix/lib/libsdstream.so.$soversion"
ln -sfn "libsdstream.so.$soversion" "$prefix/lib/libsdstream.so"
install -m 644 "$built/libsdstream.a" "$prefix/lib/libsdstream.a"

cat > "$prefix/lib/pkgconfig/sdstream.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: sdstream
Description: Real-time StreamDiffusion: the C API
Version: $version
Libs: -L\${libdir} -lsdstream
Libs.private: $native
Cflags: -I\${includedir}
EOF

cat > "$prefix/lib/cmake/sdstream/sdstreamConfig.cmake" <<EOF
# find_package(sdstream): the imported targets sdstream::sdstream (the shared library) and
# sdstream::sdstream_static; written by scripts/install-c.sh.
get_filename_component(_sdstream_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET sdstream::sdstream)
  add_library(sdstream::sdstream SHARED IMPORTED)
  set_target_properties(sdstream::sdstream PROPERTIES
    IMPORTED_LOCATION "\${_sdstream_prefix}/lib/libsdstream.so.$version"
    IMPORTED_SONAME "libsdstream.so.$soversion"
    INTERFACE_INCLUDE_DIRECTORIES "\${_sdstream_prefix}/include")
  find_package(Threads REQUIRED)
  add_library(sdstream::sdstream_static STATIC IMPORTED)
  set_target_properties(sdstream::sdstream_static PROPERTIES
    IMPORTED_LOCATION "\${_sdstream_prefix}/lib/libsdstream.a"
    INTERFACE_INCLUDE_DIRECTORIES "\${_sdstream_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;\${CMAKE_DL_LIBS};m;rt;util;gcc_s")
endif()
unset(_sdstream_prefix)
EOF

cat > "$prefix/lib/cmake/sdstream/sdstreamConfigVersion.cmake" <<EOF
# sdstream $version: a request is met by the same major version (0.x: the same minor), at or
# below this one.
set(PACKAGE_VERSION "$version")
set(PACKAGE_VERSION_COMPATIBLE FALSE)
if(NOT PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  if("$major" STREQUAL "0")
    if(PACKAGE_FIND_VERSION_MAJOR STREQUAL "0" AND PACKAGE_FIND_VERSION_MINOR STREQUAL "$minor")
      set(PACKAGE_VERSION_COMPATIBLE TRUE)
    endif()
  elseif(PACKAGE_FIND_VERSION_MAJOR STREQUAL "$major")
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
  endif()
endif()
if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()
EOF

echo "installed sdstream $version ($profile) under $prefix: include/sdstream.h," \
  "lib/libsdstream.so.$version (soname libsdstream.so.$soversion), lib/libsdstream.a," \
  "lib/pkgconfig/sdstream.pc, lib/cmake/sdstream/"
