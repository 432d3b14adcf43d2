"""Trains a PyTorch LSTM on a pixel_series cube: predict the next step of the first variable from all variables.

    python examples/train_lstm.py CUBE [--epochs 5] [--workers 2]

Prints ``epoch N loss X``. Build the cubeload Python package first: ``pip install ./python``.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from cubeload.torch import CubeDataset


class Forecaster(nn.Module):
    def __init__(self, n_vars: int, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_vars, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, V] -> [B, T]
        return self.head(self.lstm(x)[0]).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cube")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = CubeDataset(args.cube, seed=42, mix=4, normalize=True)
    probe = dataset.loader()  # the cube's layout and variables; dropped before the workers start
    layout, names = probe.layout, probe.variables
    del probe
    if layout != "pixel_series":
        raise SystemExit(f"{args.cube}: an LSTM reads pixel time series; this cube's layout is {layout}")
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)
    model, optimizer = None, None
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            x = torch.stack([batch[name] for name in names], dim=-1)  # [B, T, V]
            valid = batch["mask"][0].float()  # mask of the target (first variable), [B, T]
            if model is None:
                model = Forecaster(len(names))
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            prediction = model(x[:, :-1])
            target, weight = x[:, 1:, 0], valid[:, 1:]
            loss = ((prediction - target) ** 2 * weight).sum() / weight.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        print(f"epoch {epoch} loss {total / count:.4f}", flush=True)


if __name__ == "__main__":
    main()
