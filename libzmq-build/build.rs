//! Builds libzmq 4.3.5 from zeromq-src's vendored source with CURVE backed by the
//! libsodium that `libsodium-sys-stable` builds from its own vendored source.
//!
//! zmq-sys 0.12 always builds libzmq without libsodium, so CURVE is missing. Its
//! build script is replaced by an empty override in `.cargo/config.toml`
//! (`[target.<triple>.zmq]`), and this script emits the link lines instead. See
//! docs/dependencies.md.

fn main() {
    let lib = std::env::var("DEP_SODIUM_LIB").expect("libsodium-sys-stable exports its lib dir");
    let include =
        std::env::var("DEP_SODIUM_INCLUDE").expect("libsodium-sys-stable exports its include dir");
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, include)))
        .build();
    println!("cargo:rerun-if-changed=build.rs");
}
