//! torch-sys links libtorch but sets no rpath: without one, binaries and test binaries fail to start with
//! "`libtorch_cpu.so`: cannot open shared object file". torch-sys exports its lib dir as
//! `DEP_TCH_LIBTORCH_LIB`.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
