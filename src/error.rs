//! The crate's error: the stage errors, each of which names the file, variable or key at fault.

use crate::config::ConfigError;
use crate::cube::CubeError;
use crate::generator::GenError;
use crate::plan::PlanError;
use crate::source::SourceError;

/// Any cubeload error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Unusable input.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Cube storage.
    #[error(transparent)]
    Cube(#[from] CubeError),
    /// Generation.
    #[error(transparent)]
    Gen(#[from] GenError),
    /// Drawing a PNG.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    /// Loading batches.
    #[error(transparent)]
    Loader(#[from] crate::loader::LoaderError),
    /// The invocation asks a command for what it cannot do (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// libtorch's error in the commands `cubeload-torch` runs (`demo`'s training): a CUDA device it does not
    /// have, memory.
    #[error("libtorch: {0}")]
    Torch(String),
    /// `demo` and `bench` need the binary that links libtorch, which could not be started.
    #[error(
        "{}: cannot run it ({source}); `cubeload demo` and `cubeload bench` deliver batches into libtorch \
         tensors, which `cubeload` does not link: they run in `cubeload-torch`, which `cargo build --release` \
         builds beside it (`cargo install --path torch` installs it beside an installed `cubeload`)",
        path.display()
    )]
    TorchBinary {
        /// Where it was looked for.
        path: std::path::PathBuf,
        /// Why it did not start.
        source: std::io::Error,
    },
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Config(e) => Error::Config(e),
            PlanError::Source(e) => Error::Source(e),
        }
    }
}

impl Error {
    /// Whether the user's configuration or invocation is at fault (exit code 2) rather than the run (1).
    #[must_use]
    pub fn is_usage(&self) -> bool {
        match self {
            // The config's `output` (or the flags) must change: it names what cubeload will not replace.
            Error::Config(_) | Error::Usage(_) | Error::Cube(CubeError::OutputTaken { .. }) => true,
            Error::Source(e) => e.is_usage(),
            Error::Plot(e) => e.is_usage(),
            Error::Gen(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
