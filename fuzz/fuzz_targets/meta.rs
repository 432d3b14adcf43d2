//! The cube-metadata reader on arbitrary bytes of a root `zarr.json`: `Ok` (then the metadata is valid) or a
//! clean `Err`, never a panic or an absurd allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.zarr");
    if let Ok(meta) = cubeload::cube::validate::meta_from_root_json(path, data) {
        // What was accepted must be usable: the sizes a loader derives from it do not overflow.
        let _ = meta.chunk_counts();
        let _ = meta.layout.batch_shape();
    }
});
