//! Batches of a real loader into tensors: copies that outlive the batch, and tensors that take the batch's
//! buffer without a copy.

use std::path::PathBuf;
use std::sync::OnceLock;

use cubeload::Loader;
use cubeload::demo::{DemoSpec, build_cube};
use cubeload_torch::BatchTensors as _;

struct Cubes {
    _dir: tempfile::TempDir,
    pixel: PathBuf,
    image: PathBuf,
}

/// The demo cube (pixel series) and one of image sequences over the same inputs, made once per test run.
fn cubes() -> &'static Cubes {
    static CUBES: OnceLock<Cubes> = OnceLock::new();
    CUBES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, layout: &'static str| {
            let spec = DemoSpec { hours: 48, layout, ..DemoSpec::default() };
            build_cube(&dir.path().join(name), &spec, None).unwrap().path
        };
        let pixel = make("pixel", "{ kind: pixel_series, batch: 64 }");
        let image = make("image", "{ kind: image_sequence, seq_len: 8, patch: [8, 8], batch: 4 }");
        Cubes { _dir: dir, pixel, image }
    })
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn batches_become_tensors() {
    let b = Loader::builder(&cubes().image).build().unwrap().next().unwrap().unwrap();
    let x = b.to_tensor(tch::Device::Cpu);
    assert_eq!(x.size(), vec![4, 8, 3, 8, 8]);
    let m = b.mask_tensor(tch::Device::Cpu);
    assert_eq!(m.size(), x.size());
    let (data, mask) = (bits(&b.data), b.mask.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    assert!(mask.contains(&0.0) && mask.contains(&1.0), "the demo's cloud gaps and padding are in the mask");
    // The tensors hold copies: they outlive the batch, value for value.
    drop(b);
    assert_eq!(bits(&Vec::<f32>::try_from(x.flatten(0, -1)).unwrap()), data);
    assert_eq!(Vec::<f32>::try_from(m.flatten(0, -1)).unwrap(), mask);
}

#[test]
fn tensors_take_the_batch_buffer_without_a_copy() {
    let loader = Loader::builder(&cubes().pixel).shuffle(5).epochs(2).threads(2).build().unwrap();
    let mut batches = 0;
    for b in loader {
        let b = b.unwrap();
        let (copy, at) = (b.data.clone(), b.data.as_ptr());
        let x = b.into_tensor(tch::Device::Cpu);
        assert_eq!(
            x.data_ptr().cast_const().cast::<f32>(),
            at,
            "the tensor is the batch's buffer, not a copy"
        );
        let held: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        assert_eq!(bits(&held), bits(&copy));
        batches += 1;
    }
    assert!(batches > 2, "{batches} batches");
}
