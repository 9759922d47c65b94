"""The demo's model and its local training: an MLP 64-32-10 trained with SGD on one client's shard."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

BATCH_SIZE = 32
LEARNING_RATE = 0.05
MOMENTUM = 0.9


class DigitsMlp(nn.Module):
    """64 pixels -> 32 hidden units (ReLU) -> 10 digits: 2410 float32 parameters in four tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def initial_model(seed: int) -> DigitsMlp:
    """The model every client starts from: the same weights in every process for a given seed."""
    torch.manual_seed(seed)
    return DigitsMlp()


def round_generator(seed: int, index: int, round_number: int) -> torch.Generator:
    """The batch order of one client's round: fixed by (seed, client, round), the same in every run."""
    state = np.random.SeedSequence([seed, index, round_number]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, generator: torch.Generator
) -> float:
    """Local training (SGD with momentum, a fresh optimizer each round); the mean batch loss."""
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(targets), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the given examples."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        targets = torch.from_numpy(y)
        correct = int((logits.argmax(dim=1) == targets).sum())
        loss = float(nn.functional.cross_entropy(logits, targets))
    return correct / len(y), loss
