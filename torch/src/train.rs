//! Small reference models for the demo and the examples: what a training loop on a cube looks like with tch.
//!
//! - [`LstmForecaster`]: predicts the next step of one variable from all variables of a `pixel_series` batch.
//! - [`NextFrame`]: predicts the next frame of one variable from the current frame of all variables of an
//!   `image_sequence` batch.
//!
//! Both losses are mean squared errors over valid targets only (the batch mask): the model is never asked
//! to predict a gap or padding. As inputs, those cells hold the loader's fill value.

use tch::nn::{self, Module, RNN};
use tch::{Device, Kind, TchError, Tensor};

use cubeload::loader::{Loader, LoaderError};

use crate::BatchTensors as _;

/// An LSTM over `[B, T, V]` with a linear head.
#[derive(Debug)]
pub struct LstmForecaster {
    lstm: nn::LSTM,
    head: nn::Linear,
    target: i64,
}

impl LstmForecaster {
    /// A model for `n_vars` inputs predicting variable `target`.
    #[must_use]
    pub fn new(vs: &nn::Path, n_vars: usize, hidden: i64, target: usize) -> Self {
        let config = nn::RNNConfig { batch_first: true, ..Default::default() };
        LstmForecaster {
            lstm: nn::lstm(vs / "lstm", n_vars as i64, hidden, config),
            head: nn::linear(vs / "head", hidden, 1, nn::LinearConfig::default()),
            target: target as i64,
        }
    }

    /// Masked MSE of predicting step `t + 1` of the target from steps `..= t` of all variables.
    ///
    /// # Panics
    /// When the series have fewer than 2 steps (libtorch's LSTM refuses an empty sequence).
    pub fn loss(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let steps = x.size()[1];
        let (output, _) = self.lstm.seq(&x.narrow(1, 0, steps - 1));
        let prediction = self.head.forward(&output).squeeze_dim(-1);
        let target = x.narrow(1, 1, steps - 1).select(2, self.target);
        let valid = mask.narrow(1, 1, steps - 1).select(2, self.target);
        masked_mse(&prediction, &target, &valid)
    }
}

/// A three-layer convolutional next-frame predictor over `[B, S, V, h, w]`.
#[derive(Debug)]
pub struct NextFrame {
    net: nn::Sequential,
    target: i64,
}

impl NextFrame {
    /// A model for `n_vars` input channels predicting variable `target`.
    #[must_use]
    pub fn new(vs: &nn::Path, n_vars: usize, channels: i64, target: usize) -> Self {
        let conv = |c_in, c_out, name: &str| {
            nn::conv2d(vs / name, c_in, c_out, 3, nn::ConvConfig { padding: 1, ..Default::default() })
        };
        let net = nn::seq()
            .add(conv(n_vars as i64, channels, "conv1"))
            .add_fn(Tensor::relu)
            .add(conv(channels, channels, "conv2"))
            .add_fn(Tensor::relu)
            .add(conv(channels, 1, "conv3"));
        NextFrame { net, target: target as i64 }
    }

    /// Masked MSE of predicting frame `s + 1` of the target from frame `s` of all variables.
    ///
    /// # Panics
    /// When `x` is not `[B, S, V, h, w]` or its sequences have fewer than 2 frames (no pair to learn from).
    pub fn loss(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let [batch, frames, vars, height, width] = x.size()[..] else {
            panic!("image batches are [B, S, V, h, w]")
        };
        assert!(frames >= 2, "next-frame prediction needs sequences of at least 2 frames, not {frames}");
        let pairs = batch * (frames - 1);
        let inputs = x.narrow(1, 0, frames - 1).reshape([pairs, vars, height, width]);
        let prediction = self.net.forward(&inputs).squeeze_dim(1);
        let target = x.narrow(1, 1, frames - 1).select(2, self.target).reshape([pairs, height, width]);
        let valid = mask.narrow(1, 1, frames - 1).select(2, self.target).reshape([pairs, height, width]);
        masked_mse(&prediction, &target, &valid)
    }
}

fn masked_mse(prediction: &Tensor, target: &Tensor, valid: &Tensor) -> Tensor {
    let squared = (prediction - target).square() * valid;
    squared.sum(Kind::Float) / valid.sum(Kind::Float).clamp_min(1.0)
}

/// Why [`fit`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The loader's error (an unreadable chunk, ...).
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// libtorch's (a CUDA device it does not have, memory).
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

/// Trains `model` with Adam over every batch of `loader`; calls `on_epoch(epoch, mean loss)` after each epoch
/// and returns the mean losses. `loss` is the model's loss function.
///
/// # Errors
/// The first loader error, or libtorch's in making the tensors or the optimizer (the model's own operations
/// panic on libtorch's errors, as tch's do).
pub fn fit(
    loader: Loader,
    vs: &nn::VarStore,
    learning_rate: f64,
    loss: impl Fn(&Tensor, &Tensor) -> Tensor,
    mut on_epoch: impl FnMut(usize, f64),
) -> Result<Vec<f64>, FitError> {
    use tch::nn::OptimizerConfig;
    let device = vs.device();
    let mut optimizer = nn::Adam::default().build(vs, learning_rate)?;
    let mut losses = Vec::new();
    let (mut epoch, mut sum, mut count) = (0, 0.0, 0usize);
    for batch in loader {
        let batch = batch?;
        if batch.origin.epoch != epoch && count > 0 {
            losses.push(sum / count as f64);
            on_epoch(epoch, sum / count as f64);
            (sum, count) = (0.0, 0);
        }
        epoch = batch.origin.epoch;
        let mask = batch.mask_tensor(device)?;
        let x = batch.into_tensor(device)?;
        let value = loss(&x, &mask);
        optimizer.backward_step(&value);
        sum += value.double_value(&[]);
        count += 1;
    }
    if count > 0 {
        losses.push(sum / count as f64);
        on_epoch(epoch, sum / count as f64);
    }
    Ok(losses)
}

/// The device to train on: the first CUDA GPU when there is one.
#[must_use]
pub fn device() -> Device {
    Device::cuda_if_available()
}
