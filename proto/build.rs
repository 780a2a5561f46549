//! Generates the `prism.v1` messages and services with the vendored `protoc`,
//! so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Weight chunks and encoded entries are sliced, not copied.
        .bytes(".prism.v1.WeightChunk.data")
        .compile_protos(&["proto/prism/v1/prism.proto"], &["proto"])?;
    Ok(())
}
