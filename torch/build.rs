//! Two things this crate needs from libtorch, whose lib dir torch-sys exports as `DEP_TCH_LIBTORCH_LIB`:
//! - an rpath: torch-sys links libtorch but sets none, and binaries and test binaries would fail to start
//!   with "`libtorch_cpu.so`: cannot open shared object file";
//! - `src/owned_tensor.cpp`, compiled against libtorch's headers: a CPU tensor over a batch's own
//!   memory that gives it back when libtorch frees the tensor (tch has no constructor with a deleter).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=src/owned_tensor.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let include = Path::new(&lib).parent().expect("libtorch's lib dir has a parent").join("include");
    // The same C++ standard and ABI as torch-sys compiles its own wrapper with (its default ABI is 1).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        // libtorch's headers as system headers: their own warnings are not this crate's.
        .flag("-isystem")
        .flag(include.to_str().expect("libtorch's include dir is UTF-8"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/owned_tensor.cpp")
        .compile("cubeload_owned_tensor");
}
