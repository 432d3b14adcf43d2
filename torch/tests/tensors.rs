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
    /// Batches of 512 series, large enough for their buffers to be kept when given back.
    wide: PathBuf,
}

/// The demo cube (pixel series), and others of image sequences and wider batches over the same inputs, made
/// once per test run.
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
        let wide = make("wide", "{ kind: pixel_series, batch: 512 }");
        Cubes { _dir: dir, pixel, image, wide }
    })
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn batches_become_tensors() {
    let b = Loader::builder(&cubes().image).build().unwrap().next().unwrap().unwrap();
    let x = b.to_tensor(tch::Device::Cpu).unwrap();
    assert_eq!(x.size(), vec![4, 8, 3, 8, 8]);
    let m = b.mask_tensor(tch::Device::Cpu).unwrap();
    assert_eq!(m.size(), x.size());
    let (data, mask) = (bits(&b.data), b.mask.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    assert!(mask.contains(&0.0) && mask.contains(&1.0), "the demo's cloud gaps and padding are in the mask");
    // The tensors hold copies: they outlive the batch, value for value.
    drop(b);
    assert_eq!(bits(&Vec::<f32>::try_from(x.flatten(0, -1)).unwrap()), data);
    assert_eq!(Vec::<f32>::try_from(m.flatten(0, -1)).unwrap(), mask);
}

/// Statics delivered apart come with their mask: the padding of the image cube's last patches, and the land
/// cover's own gaps, are 0 there, as in the mask of the batches that repeat them along time.
#[test]
fn statics_apart_come_with_their_mask() {
    let cube = &cubes().image;
    let apart = Loader::builder(cube).separate_statics(true).build().unwrap();
    let whole = Loader::builder(cube).build().unwrap();
    let mut missing = 0.0;
    for (a, w) in apart.zip(whole) {
        let (a, w) = (a.unwrap(), w.unwrap());
        let (values, mask) =
            (a.statics_tensor(tch::Device::Cpu).unwrap(), a.statics_mask_tensor(tch::Device::Cpu).unwrap());
        assert_eq!(mask.size(), values.size());
        // [B, S, V, h, w] with the statics last: their first step, against [B, Vs, h, w].
        let v = w.variables.len() - 1;
        let repeated = w.mask_tensor(tch::Device::Cpu).unwrap().select(1, 0).narrow(1, v as i64, 1);
        assert_eq!(
            Vec::<f32>::try_from(mask.flatten(0, -1)).unwrap(),
            Vec::<f32>::try_from(repeated.flatten(0, -1)).unwrap()
        );
        missing += f64::try_from(mask.eq(0.0).sum(tch::Kind::Float)).unwrap();
    }
    assert!(missing > 0.0, "the image cube's padding is among the statics");
}

/// A coarser variable at its native resolution (`Regrid::Native`) becomes tensors of its field's shape and
/// values, its mask from the field's; a batch without such fields gives none.
#[test]
fn native_fields_become_tensors() {
    use cubeload::config::Config;
    use cubeload::{GenOptions, Plan, Regrid, generate};
    let dir = tempfile::tempdir().unwrap();
    let spec = DemoSpec {
        hours: 48,
        layout: "{ kind: pixel_series, batch: 64, multires: true }",
        ..DemoSpec::default()
    };
    let demo = build_cube(dir.path(), &spec, None).unwrap().path;
    let text = std::fs::read_to_string(dir.path().join("demo.yaml"))
        .unwrap()
        .replace("units: K }", "units: K, resolution: 0.05 }")
        .replace(&demo.display().to_string(), &dir.path().join("multires.zarr").display().to_string());
    let plan =
        Plan::new(Config::from_yaml(&text, std::path::Path::new("multires.yaml")).unwrap(), text).unwrap();
    let cube = generate(&plan, &GenOptions::default(), &|_, _| {}).unwrap().path;
    let mut fields = 0;
    for b in Loader::builder(&cube).regrid(Regrid::Native).build().unwrap() {
        let b = b.unwrap();
        let tensors = b.native_tensors(tch::Device::Cpu).unwrap();
        assert_eq!(tensors.len(), b.native.len());
        for (t, field) in tensors.iter().zip(&b.native) {
            assert_eq!(t.name, field.name);
            let shape: Vec<i64> = field.shape.iter().map(|&d| d as i64).collect();
            assert_eq!((t.data.size(), t.mask.size()), (shape.clone(), shape));
            assert_eq!(bits(&Vec::<f32>::try_from(t.data.flatten(0, -1)).unwrap()), bits(&field.data));
            let mask: Vec<f32> = field.mask.iter().map(|&v| f32::from(v)).collect();
            assert_eq!(Vec::<f32>::try_from(t.mask.flatten(0, -1)).unwrap(), mask);
            fields += 1;
        }
    }
    assert!(fields > 0, "t2m comes at its native 0.05°");
    let b = Loader::builder(&demo).build().unwrap().next().unwrap().unwrap();
    assert!(b.native_tensors(tch::Device::Cpu).unwrap().is_empty());
}

/// A CUDA device this libtorch cannot use is an error naming it, not libtorch's panic.
#[test]
fn a_cuda_device_without_cuda_is_an_error() {
    if tch::Cuda::is_available() {
        return; // a GPU machine: the path works there
    }
    let b = Loader::builder(&cubes().image).build().unwrap().next().unwrap().unwrap();
    let error = b.to_tensor(tch::Device::Cuda(0)).unwrap_err().to_string();
    assert!(error.contains("CUDA device 0 asked for"), "{error}");
    assert!(b.mask_tensor(tch::Device::Cuda(0)).is_err());
    assert!(b.into_tensor(tch::Device::Cuda(0)).is_err());
}

#[test]
fn tensors_take_the_batch_buffer_without_a_copy() {
    let loader = Loader::builder(&cubes().pixel).shuffle(5).epochs(2).threads(2).build().unwrap();
    let mut batches = 0;
    for b in loader {
        let b = b.unwrap();
        let (copy, at) = (b.data.clone(), b.data.as_ptr());
        let x = b.into_tensor(tch::Device::Cpu).unwrap();
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

/// A tensor that took a batch's buffer gives it back when libtorch frees it, and the batch's mask is given
/// back at once: the next batch is made in both. (No other test makes batches of this size.)
#[test]
fn a_freed_tensor_gives_its_buffer_to_the_next_batch() {
    let mut loader = Loader::builder(&cubes().wide).shuffle(1).threads(0).build().unwrap();
    let first = loader.next().unwrap().unwrap();
    let (data_at, mask_at, cells) = (first.data.as_ptr(), first.mask.as_ptr(), first.data.len());
    let tensor = first.into_tensor(tch::Device::Cpu).unwrap();
    let view = tensor.select(0, 0);
    drop(tensor);
    // Memory freed instead of given back would be taken by these.
    let between = (Vec::<f32>::with_capacity(cells), Vec::<u8>::with_capacity(cells));
    let second = loader.next().unwrap().unwrap();
    assert_eq!(second.mask.as_ptr(), mask_at, "the mask was given back with the batch");
    assert_ne!(second.data.as_ptr(), data_at, "a view still holds the tensor's storage");
    drop(view);
    let after = Vec::<f32>::with_capacity(cells);
    let third = loader.next().unwrap().unwrap();
    assert_eq!(third.data.as_ptr(), data_at, "given back when its last view was freed");
    drop((between, after, second, third));
}
