include!("../build-support/torch.rs");

fn main() {
    link_torch();
    small_gemm();
}

/// Compiles csrc/small_gemm.cpp (x86-64 only; elsewhere decoding keeps to
/// torch's matrix products) against the OpenMP runtime torch ships, so that
/// its threads are torch's.
fn small_gemm() {
    println!("cargo::rustc-check-cfg=cfg(small_gemm)");
    println!("cargo:rerun-if-changed=csrc/small_gemm.cpp");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") || std::env::var("LIBTORCH").is_err() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/small_gemm.cpp")
        .flag("-std=c++17")
        .flag("-fopenmp")
        // GCC 12's own _mm512_reduce_add_ps trips -Wuninitialized in its header.
        .flag("-Wno-uninitialized")
        .opt_level(3)
        .compile("prism_small_gemm");
    // torch's own libgomp (in its lib folder, which link_torch searches).
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    println!("cargo:rustc-cfg=small_gemm");
}
