include!("../build-support/torch.rs");

fn main() {
    link_torch();
    cpu_kernels();
}

/// Compiles csrc/ (the decode step's float32 kernels; x86-64 only, elsewhere
/// decoding keeps to torch) against the OpenMP runtime torch ships, so that
/// their threads are torch's.
fn cpu_kernels() {
    println!("cargo::rustc-check-cfg=cfg(cpu_kernels)");
    for f in [
        "csrc/gemm.h",
        "csrc/small_gemm.cpp",
        "csrc/decode_layer.cpp",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64")
        || std::env::var("LIBTORCH").is_err()
    {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/small_gemm.cpp")
        .file("csrc/decode_layer.cpp")
        .flag("-std=c++17")
        .flag("-fopenmp")
        // GCC 12's own _mm512_reduce_add_ps trips -Wuninitialized in its header.
        .flag("-Wno-uninitialized")
        .opt_level(3)
        .compile("prism_cpu_kernels");
    // torch's own libgomp (in its lib folder, which link_torch searches).
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    println!("cargo:rustc-cfg=cpu_kernels");
}
