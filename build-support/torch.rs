// Shared by the build scripts of every package whose binaries link libtorch
// (included with `include!`, so each build.rs stays one line).
//
// Two things the torch-sys build does not do for the final link:
// - an rpath to libtorch's lib folder, so binaries and test executables run from a
//   plain shell without LD_LIBRARY_PATH (it becomes RUNPATH, so LD_LIBRARY_PATH
//   still wins, which is how a binary built here runs on a GPU machine);
// - `--no-as-needed` around `-ltorch_cuda`: nothing in our objects references
//   libtorch_cuda.so directly, so the default `--as-needed` drops it and CUDA is
//   then never available at run time (measured; see DESIGN.md "Versions pinned").
fn link_torch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    let root = std::path::Path::new(&libtorch);
    // Resolve the `.venv/libtorch` link so the rpath names the real folder.
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let lib = root.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
