//! `cubeload._cubeload`: a thin binding of the Rust loader. Batches are handed to numpy without copying:
//! each batch's buffer is a Rust `Vec` that numpy adopts, and the per-variable arrays are views of it; the
//! values and mask go back to the loaders when numpy frees the last array over them. The GIL is released
//! while waiting for a batch. No libtorch is linked: `torch.from_numpy` shares the arrays
//! with whatever torch the user has.

use std::mem::ManuallyDrop;
use std::path::PathBuf;

use cubeload::loader::{LoaderError, LoaderState, OnCorrupt, Regrid};
use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

/// Batches are megabytes each, allocated by reader threads and freed by numpy in the Python thread:
/// cubeload's allocator (mimalloc, which reuses such blocks where glibc's would hand them back to the kernel,
/// with batch buffers on huge pages) takes Rust's allocations; numpy's and torch's own stay with theirs.
#[global_allocator]
static ALLOCATOR: cubeload::Allocator = cubeload::Allocator;

create_exception!(cubeload._cubeload, CubeloadError, PyException, "Base class of cubeload's errors.");
create_exception!(
    cubeload._cubeload,
    CubeError,
    CubeloadError,
    "The cube is missing, incomplete or not a cubeload cube."
);
create_exception!(
    cubeload._cubeload,
    UnknownVariableError,
    CubeloadError,
    "A requested variable is not in the cube."
);
create_exception!(
    cubeload._cubeload,
    CorruptChunkError,
    CubeloadError,
    "A chunk of the cube cannot be read or decoded."
);

/// Maps a loader error to its Python exception, with the Rust message.
fn to_py_err(error: LoaderError) -> PyErr {
    let message = error.to_string();
    match error {
        LoaderError::Cube(_) => CubeError::new_err(message),
        LoaderError::UnknownVariable { .. } => UnknownVariableError::new_err(message),
        LoaderError::Invalid(_) => PyValueError::new_err(message),
        LoaderError::Read { .. } => CorruptChunkError::new_err(message),
        _ => CubeloadError::new_err(message),
    }
}

/// The keys of a batch dict besides its variables.
const BATCH_KEYS: [&str; 9] =
    ["mask", "static_mask", "lat", "lon", "time_index", "epoch", "position", "chunk", "native"];

/// An iterator over the batches (dicts of numpy arrays) of a cubeload cube: one pass over its epochs.
#[pyclass(module = "cubeload._cubeload")]
struct Loader {
    /// Dropped by hand (see `Drop`): its reader threads are not joined in a forked child, which has none
    /// of them.
    inner: ManuallyDrop<cubeload::Loader>,
    /// Epochs asked, kept in `state()` so that a resume runs as many.
    epochs: usize,
    /// `min_valid` asked, kept in `state()` so that a resume chooses the same batches.
    min_valid: Option<f64>,
    /// The process that built it: after a `fork`, the child has none of its threads.
    pid: u32,
    variables: Vec<String>,
    /// Static variables delivered once per sample (`separate_statics=True`), in the order of the batch's
    /// statics.
    static_variables: Vec<String>,
    /// A batch made while a signal (Ctrl-C) came, kept for the next call instead of returned, and the state
    /// before it: returned, it would be lost to the `KeyboardInterrupt` Python raises as the call returns.
    held: Option<(Py<PyDict>, LoaderState)>,
}

/// `value` as a `T`, or an error that names `what` (a keyword argument, or a key of a state): pyo3 names the
/// argument of a wrong type only, not of a negative count, and never a key of a dict.
fn named<'py, T: FromPyObjectOwned<'py>>(what: &str, value: &Bound<'py, PyAny>) -> PyResult<T> {
    value.extract::<T>().map_err(|error| {
        let error: PyErr = error.into();
        let py = value.py();
        let repr = value.repr().map_or_else(|_| "?".to_owned(), |r| r.to_string());
        let message = format!("{what}={repr}: {}", error.value(py));
        // A negative count (`OverflowError`) is a bad value; a wrong type stays a `TypeError`.
        if error.is_instance_of::<PyTypeError>(py) {
            PyTypeError::new_err(message)
        } else {
            PyValueError::new_err(message)
        }
    })
}

/// An optional keyword argument as a `T`, named in its error.
fn named_opt<'py, T: FromPyObjectOwned<'py>>(
    what: &str,
    value: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<T>> {
    value.map(|v| named(what, v)).transpose()
}

fn state_from_dict(state: &Bound<'_, PyDict>) -> PyResult<LoaderState> {
    let get = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        state.get_item(key)?.ok_or_else(|| PyValueError::new_err(format!("state: missing key `{key}`")))
    };
    let key = |key: &str| format!("state[{key:?}]");
    let required = |k: &str| -> PyResult<usize> { named(&key(k), &get(k)?) };
    let optional = |k: &str, default: usize| -> PyResult<usize> {
        state.get_item(k)?.map_or(Ok(default), |v| named(&key(k), &v))
    };
    Ok(LoaderState {
        seed: named(&key("seed"), &get("seed")?)?,
        shuffle: named(&key("shuffle"), &get("shuffle")?)?,
        epoch: required("epoch")?,
        cursor: required("cursor")?,
        rank: required("rank")?,
        world_size: required("world_size")?,
        worker: optional("worker", 0)?,
        workers: optional("workers", 1)?,
        mix: optional("mix", 1)?,
        digest: state
            .get_item("digest")?
            .map(|v| named::<Option<u64>>(&key("digest"), &v))
            .transpose()?
            .flatten(),
    })
}

/// A keyword argument given with a state must agree with it: the state decides the batches it continues.
fn agrees<T: PartialEq + std::fmt::Debug>(name: &str, given: Option<T>, saved: T) -> PyResult<T> {
    match given {
        Some(given) if given != saved => Err(PyValueError::new_err(format!(
            "{name}={given:?} differs from the state's {name}, {saved:?}: a state continues the run it was saved \
             by (leave {name} out, or start afresh without the state)"
        ))),
        _ => Ok(saved),
    }
}

#[pymethods]
impl Loader {
    #[new]
    #[pyo3(signature = (
        path, variables=None, *, shuffle=None, seed=None, epochs=None, rank=None, world_size=None, worker=None,
        workers=None, prefetch=None, threads=None, fetchers=None, mix=None, normalize=false, fill_value=0.0, min_valid=None, state=None,
        on_corrupt="error", regrid="target", separate_statics=false,
    ))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn new(
        py: Python<'_>,
        path: PathBuf,
        variables: Option<Bound<'_, PyAny>>,
        shuffle: Option<bool>,
        seed: Option<Bound<'_, PyAny>>,
        epochs: Option<Bound<'_, PyAny>>,
        rank: Option<Bound<'_, PyAny>>,
        world_size: Option<Bound<'_, PyAny>>,
        worker: Option<Bound<'_, PyAny>>,
        workers: Option<Bound<'_, PyAny>>,
        prefetch: Option<Bound<'_, PyAny>>,
        threads: Option<Bound<'_, PyAny>>,
        fetchers: Option<Bound<'_, PyAny>>,
        mix: Option<Bound<'_, PyAny>>,
        normalize: bool,
        fill_value: f64,
        min_valid: Option<f64>,
        state: Option<&Bound<'_, PyDict>>,
        on_corrupt: &str,
        regrid: &str,
        separate_statics: bool,
    ) -> PyResult<Self> {
        let regrid = match regrid {
            "target" => Regrid::Target,
            "native" => Regrid::Native,
            other => {
                return Err(PyValueError::new_err(format!(
                    "regrid must be \"target\" or \"native\", not {other:?}"
                )));
            }
        };
        let on_corrupt = match on_corrupt {
            "error" => OnCorrupt::Error,
            "skip" => OnCorrupt::Skip,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_corrupt must be \"error\" or \"skip\", not {other:?}"
                )));
            }
        };
        // One name is not a list of them (it would be taken as a list of its letters by Python code).
        if let Some(name) = variables.as_ref().filter(|v| v.is_instance_of::<PyString>()) {
            return Err(PyTypeError::new_err(format!(
                "variables={0} is one string: give a list of names, such as [{0}]",
                name.repr()?
            )));
        }
        // Batches are float32: a finite fill beyond its range would become ∞ (NaN and ±∞ are taken as given).
        let fill = fill_value as f32;
        if fill.is_infinite() && fill_value.is_finite() {
            return Err(PyValueError::new_err(format!(
                "fill_value {fill_value:e}: batches are float32, whose largest value is {:e}",
                f32::MAX
            )));
        }
        let variables: Option<Vec<String>> = named_opt("variables", variables.as_ref())?;
        // Counts named in their errors (a negative one is a `ValueError` naming it, not a bare `OverflowError`).
        let seed: Option<u64> = named_opt("seed", seed.as_ref())?;
        let [epochs, rank, world_size, worker, workers, prefetch, threads, fetchers, mix] = [
            ("epochs", epochs),
            ("rank", rank),
            ("world_size", world_size),
            ("worker", worker),
            ("workers", workers),
            ("prefetch", prefetch),
            ("threads", threads),
            ("fetchers", fetchers),
            ("mix", mix),
        ]
        .map(|(name, value)| named_opt::<usize>(name, value.as_ref()));
        let (epochs, rank, world_size, worker, workers, prefetch, threads, fetchers, mix) =
            (epochs?, rank?, world_size?, worker?, workers?, prefetch?, threads?, fetchers?, mix?);
        // A state carries the epochs and variables of the run it continues (the variables choose the batches:
        // those without a valid value in any of them are left out).
        let resumed = |key: &str| state.map(|s| s.get_item(key)).transpose().map(Option::flatten);
        let epochs = match (epochs, resumed("epochs")?) {
            (Some(epochs), _) => epochs,
            (None, Some(kept)) => named(r#"state["epochs"]"#, &kept)?,
            (None, None) => 1,
        };
        let same = |a: &[String], mut b: Vec<String>| {
            let mut a = a.to_vec();
            a.sort();
            b.sort();
            a == b
        };
        let variables = match (variables, resumed("variables")?) {
            (Some(given), Some(kept)) if !same(&given, named(r#"state["variables"]"#, &kept)?) => {
                return Err(PyValueError::new_err(format!(
                    "variables {given:?} differ from those of the state, {kept}: the batches would not be the \
                     ones it continues"
                )));
            }
            (Some(given), _) => Some(given),
            (None, kept) => kept.map(|k| named(r#"state["variables"]"#, &k)).transpose()?,
        };
        // `min_valid` too chooses the batches: a state carries it (states of earlier versions do not).
        let min_valid = match (min_valid, resumed("min_valid")?) {
            (Some(given), _) => Some(given),
            (None, kept) => {
                kept.map(|k| named::<Option<f64>>(r#"state["min_valid"]"#, &k)).transpose()?.flatten()
            }
        };
        if variables.as_ref().is_some_and(Vec::is_empty) {
            return Err(PyValueError::new_err(
                "variables=[] asks for no variable: pass None for all of them",
            ));
        }
        let saved = state.map(state_from_dict).transpose()?;
        let (shuffle, seed, rank, world_size, worker, workers, mix) = match &saved {
            Some(s) => (
                agrees("shuffle", shuffle, s.shuffle)?,
                agrees("seed", seed, s.seed)?,
                agrees("rank", rank, s.rank)?,
                agrees("world_size", world_size, s.world_size)?,
                agrees("worker", worker, s.worker)?,
                agrees("workers", workers, s.workers)?,
                agrees("mix", mix, s.mix)?,
            ),
            None => (
                shuffle.unwrap_or(true),
                seed.unwrap_or(0),
                rank.unwrap_or(0),
                world_size.unwrap_or(1),
                worker.unwrap_or(0),
                workers.unwrap_or(1),
                mix.unwrap_or(1),
            ),
        };
        let mut builder = cubeload::Loader::builder(&path)
            .epochs(epochs)
            .threads(threads.unwrap_or(2))
            .shard(rank, world_size)
            .worker(worker, workers)
            .mix(mix)
            .normalize(normalize)
            .fill_value(fill)
            .on_corrupt(on_corrupt)
            .regrid(regrid)
            .separate_statics(separate_statics)
            .variable_major(true);
        if let Some(prefetch) = prefetch {
            builder = builder.prefetch(prefetch);
        }
        if let Some(fetchers) = fetchers {
            builder = builder.fetchers(fetchers);
        }
        if let Some(variables) = variables {
            builder = builder.variables(variables);
        }
        // The seed mixes (`mix`) with or without shuffling.
        builder = builder.seed(seed);
        if shuffle {
            builder = builder.shuffle(seed);
        }
        if let Some(fraction) = min_valid {
            builder = builder.min_valid(fraction);
        }
        if let Some(saved) = saved {
            builder = builder.resume(saved);
        }
        let inner = py.detach(move || builder.build()).map_err(to_py_err)?;
        let (variables, static_variables) = inner.variable_names();
        // A batch is a dict: a variable named like one of its other keys would be overwritten by it.
        if let Some(name) =
            variables.iter().chain(&static_variables).find(|n| BATCH_KEYS.contains(&n.as_str()))
        {
            return Err(PyValueError::new_err(format!(
                "variable `{name}` has the name of a batch key ({}): load the cube without it, or rename it",
                BATCH_KEYS.join(", ")
            )));
        }
        Ok(Loader {
            inner: ManuallyDrop::new(inner),
            epochs,
            min_valid,
            pid: std::process::id(),
            variables,
            static_variables,
            held: None,
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        // A forked child has no reader threads: it would wait for their batches forever.
        if std::process::id() != slf.pid {
            return Err(CubeloadError::new_err(
                "this Loader was built in another process (before a fork): build it in the process that \
                 iterates (cubeload.torch.CubeDataset does, in each DataLoader worker)",
            ));
        }
        if let Some((batch, _)) = slf.held.take() {
            return Ok(Some(batch));
        }
        let before = slf.inner.state();
        // Waited for in slices, so that a signal (Ctrl-C) is seen while a slow store keeps the batch back.
        let next = loop {
            let inner = &mut slf.inner;
            match py.detach(|| inner.next_within(std::time::Duration::from_millis(100))) {
                Ok(next) => break next,
                Err(cubeload::loader::TimedOut) => py.check_signals()?,
            }
        };
        let batch = match next {
            None => return Ok(None),
            Some(Err(e)) => return Err(to_py_err(e)),
            Some(Ok(batch)) => batch_to_dict(py, batch, &slf.variables, &slf.static_variables)?,
        };
        // A signal that came while the batch was made is raised now, the batch kept for the next call and
        // `state()` left before it: Python would raise it as this call returns, and the batch, counted as
        // delivered, would be lost to a caller that catches the `KeyboardInterrupt` and goes on.
        if let Err(signal) = py.check_signals() {
            slf.held = Some((batch, before));
            return Err(signal);
        }
        Ok(Some(batch))
    }

    /// Where the loader stands, as plain JSON-able data; pass it as `state=` to resume.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.held.as_ref().map_or_else(|| self.inner.state(), |(_, before)| *before);
        let dict = PyDict::new(py);
        dict.set_item("seed", s.seed)?;
        dict.set_item("shuffle", s.shuffle)?;
        dict.set_item("epoch", s.epoch)?;
        dict.set_item("cursor", s.cursor)?;
        dict.set_item("rank", s.rank)?;
        dict.set_item("world_size", s.world_size)?;
        dict.set_item("worker", s.worker)?;
        dict.set_item("workers", s.workers)?;
        dict.set_item("mix", s.mix)?;
        dict.set_item("digest", s.digest)?;
        dict.set_item("epochs", self.epochs)?;
        dict.set_item("min_valid", self.min_valid)?;
        // Every variable read, those delivered at their native resolution (`regrid="native"`) included.
        dict.set_item("variables", self.inner.selected_variables())?;
        Ok(dict)
    }

    /// Variable names, in the order of the batches' `mask` axis 0.
    #[getter]
    fn variables(&self) -> Vec<String> {
        self.variables.clone()
    }

    /// Static variables delivered once per sample (`separate_statics=True`; empty otherwise).
    #[getter]
    fn static_variables(&self) -> Vec<String> {
        self.static_variables.clone()
    }

    /// Batches left out so far with ``on_corrupt="skip"``, each for a chunk it could not read.
    #[getter]
    fn corrupt_chunks(&self) -> usize {
        self.inner.corrupt_chunks()
    }

    /// Batches per epoch for this rank and worker.
    #[getter]
    fn batches_per_epoch(&self) -> usize {
        self.inner.batches_per_epoch()
    }

    /// Batches the reader threads may hold ready: `prefetch`, or by default as many as 32 MiB hold (4 to
    /// 1024).
    #[getter]
    fn prefetch_depth(&self) -> usize {
        self.inner.prefetch_depth()
    }

    /// `pixel_series` or `image_sequence`.
    #[getter]
    fn layout(&self) -> &'static str {
        match self.inner.meta().layout.kind {
            cubeload::layout::LayoutKind::PixelSeries => "pixel_series",
            cubeload::layout::LayoutKind::ImageSequence => "image_sequence",
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // SAFETY: `inner` is taken once, here, and `self` is not used after.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        if std::process::id() != self.pid {
            // A forked child (a DataLoader worker holding the parent's loader) has none of the reader
            // threads: joining them would fail. Their memory is the parent's copy, freed with the process.
            std::mem::forget(inner);
            return;
        }
        // With the GIL held, as Python drops it: releasing it here would let other threads run in the middle
        // of whatever destruction dropped the loader.
        drop(inner);
    }
}

/// A batch's values and mask behind its numpy arrays, given back to the loaders for their next batches when
/// numpy frees the last array over them (`cubeload::loader::buffers`): a batch made in fresh memory has its
/// pages faulted in by the reader.
#[pyclass(frozen, module = "cubeload._cubeload")]
struct BatchBuffers {
    data: Vec<f32>,
    mask: Vec<u8>,
}

impl Drop for BatchBuffers {
    fn drop(&mut self) {
        cubeload::loader::buffers::give_back(std::mem::take(&mut self.data));
        cubeload::loader::buffers::give_back(std::mem::take(&mut self.mask));
    }
}

/// A 1-D array over `values`, which `owner` holds.
fn borrowed<'py, T: numpy::Element>(
    values: &[T],
    owner: &Bound<'py, BatchBuffers>,
) -> Bound<'py, PyArray1<T>> {
    // SAFETY: `owner` is frozen: its vectors are neither changed nor moved until it is dropped, which numpy
    // does only after the array (and every view of it), whose base it is, is gone.
    unsafe { PyArray1::borrow_from_array(&ArrayView1::from(values), owner.clone().into_any()) }
}

/// The batch as a dict; every array is a view of one Rust-owned buffer (no copy).
fn batch_to_dict(
    py: Python<'_>,
    batch: cubeload::Batch,
    variables: &[String],
    static_variables: &[String],
) -> PyResult<Py<PyDict>> {
    let dict = PyDict::new(py);
    let statics_shape = batch.statics_shape();
    let owner = Bound::new(py, BatchBuffers { data: batch.data, mask: batch.mask })?;
    let data = borrowed(&owner.get().data, &owner).reshape(batch.shape.clone())?;
    for (i, name) in variables.iter().enumerate() {
        dict.set_item(name, data.get_item(i)?)?;
    }
    // Statics apart, made `[B, S]` (or `[B, S, h, w]`): each variable copied out of its column, so that it is
    // a contiguous array of its own (`.view()` in torch works), a few values per sample.
    if !static_variables.is_empty() {
        let statics = PyArray1::from_vec(py, batch.statics).reshape(statics_shape.clone())?;
        for (j, name) in static_variables.iter().enumerate() {
            let column = (pyo3::types::PySlice::full(py), j);
            dict.set_item(name, statics.get_item(column)?.call_method0("copy")?)?;
        }
        // Their mask `[S, B]` (or `[S, B, h, w]`), as `mask` is `[V, B, ...]`: the axes swapped, copied.
        let mask = PyArray1::from_vec(py, batch.statics_mask).reshape(statics_shape)?;
        let mask = mask.call_method1("view", ("bool",))?.call_method1("swapaxes", (0, 1))?;
        dict.set_item("static_mask", mask.call_method0("copy")?)?;
    }
    let mask = borrowed(&owner.get().mask, &owner).reshape(batch.shape)?;
    dict.set_item("mask", mask.call_method1("view", ("bool",))?)?;
    dict.set_item("lat", PyArray1::from_vec(py, batch.lat))?;
    dict.set_item("lon", PyArray1::from_vec(py, batch.lon))?;
    let time_index: Vec<i64> = batch.time_index.iter().map(|&t| t as i64).collect();
    dict.set_item("time_index", PyArray1::from_vec(py, time_index))?;
    dict.set_item("epoch", batch.origin.epoch)?;
    dict.set_item("position", batch.origin.position)?;
    dict.set_item("chunk", PyTuple::new(py, batch.origin.chunk)?)?;
    // Multi-resolution cubes with regrid="native": each coarser variable at its own resolution.
    if !batch.native.is_empty() {
        let native = PyDict::new(py);
        for field in batch.native {
            let entry = PyDict::new(py);
            entry.set_item("data", PyArray1::from_vec(py, field.data).reshape(field.shape.clone())?)?;
            let mask = PyArray1::from_vec(py, field.mask).reshape(field.shape)?;
            entry.set_item("mask", mask.call_method1("view", ("bool",))?)?;
            entry.set_item("origin", PyTuple::new(py, field.origin)?)?;
            entry.set_item("factor", PyTuple::new(py, field.factor)?)?;
            native.set_item(field.name, entry)?;
        }
        dict.set_item("native", native)?;
    }
    Ok(dict.unbind())
}

/// Bytes of batch buffers this process keeps for its loaders' next batches: the values and masks of batches
/// whose arrays numpy has freed (at most 64 MiB of each).
#[pyfunction]
fn kept_buffer_bytes() -> usize {
    cubeload::loader::buffers::kept_bytes()
}

#[pymodule]
fn _cubeload(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Loader>()?;
    m.add_function(wrap_pyfunction!(kept_buffer_bytes, m)?)?;
    m.add("CubeloadError", m.py().get_type::<CubeloadError>())?;
    m.add("CubeError", m.py().get_type::<CubeError>())?;
    m.add("UnknownVariableError", m.py().get_type::<UnknownVariableError>())?;
    m.add("CorruptChunkError", m.py().get_type::<CorruptChunkError>())?;
    Ok(())
}
