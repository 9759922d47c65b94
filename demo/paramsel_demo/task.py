"""The demo's task: scikit-learn's bundled 8x8 digits (no download) in non-IID client shards, and an
MLP 64-32-10 (64-256-10 for ``paramsel-demo --compare``) trained with SGD on one shard.

Every process derives the same split from the seed: a stratified held-out test split (the accuracy
every client reports), and a label-skewed partition of the rest, one shard per client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TEST_FRACTION = 0.2
"""Share of the 1797 digits held out for the accuracy figures (stratified, so every class is in it)."""


@dataclass(frozen=True)
class Shard:
    """One client's training examples, and the held-out test split every client evaluates on."""

    x_train: np.ndarray
    """float32, (n, 64): pixel intensities scaled to [0, 1]."""
    y_train: np.ndarray
    """int64, (n,): the digit."""
    x_test: np.ndarray
    y_test: np.ndarray


def label_skew_split(labels: np.ndarray, clients: int, skew: float, seed: int) -> list[np.ndarray]:
    """A non-IID partition of ``range(len(labels))`` into ``clients`` shards, skewed by label.

    Class ``c`` has the home client ``c % clients``, which gets ``floor(skew * n_c + 1/2)`` of its examples;
    the rest are split as evenly as possible among the other clients, in client order (the earlier
    clients get the one extra when it does not divide). Which examples go where is drawn by
    ``np.random.default_rng(seed)``. Each shard comes back as sorted indices; the shards are disjoint
    and cover every index. With ``skew=1`` every class lives on one client only; with
    ``skew=1/clients`` the split is (about) IID.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        home = int(label) % clients
        kept = math.floor(skew * len(members) + 0.5) if clients > 1 else len(members)
        parts[home].append(members[:kept])
        others = [client for client in range(clients) if client != home]
        if others:
            for client, chunk in zip(others, np.array_split(members[kept:], len(others)), strict=True):
                parts[client].append(chunk)
    return [np.sort(np.concatenate(part)) if part else np.zeros(0, dtype=np.int64) for part in parts]


def load_shard(index: int, clients: int, *, skew: float, seed: int) -> Shard:
    """Client ``index``'s shard of the digits (and the common test split), for the given seed."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    if not 0 <= index < clients:
        raise ValueError(f"client index must be in [0, {clients}), got {index}")
    x, y = load_digits(return_X_y=True)
    x = (np.asarray(x, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(y, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    mine = label_skew_split(y_train, clients, skew, seed)[index]
    return Shard(x_train[mine], y_train[mine], x_test, y_test)


BATCH_SIZE = 32
LEARNING_RATE = 0.05
"""SGD's step size (``paramsel-demo --compare --learning-rate`` sets another for every exchange)."""
MOMENTUM = 0.9


HIDDEN_UNITS = 32
"""The demo's hidden layer: 2410 parameters. ``paramsel-demo --compare`` uses 256 (19,210), so that the
framing of its payloads does not dominate them."""


class DigitsMlp(nn.Module):
    """64 pixels -> ``hidden`` units (ReLU) -> 10 digits: 74 x hidden + 10 float32 parameters in four
    tensors (2410 with the default 32 hidden units)."""

    def __init__(self, hidden: int = HIDDEN_UNITS) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden units must be >= 1, got {hidden}")
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def initial_model(seed: int, hidden: int = HIDDEN_UNITS) -> DigitsMlp:
    """The model every client starts from: the same weights in every process for a given seed."""
    torch.manual_seed(seed)
    return DigitsMlp(hidden)


def round_generator(seed: int, index: int, round_number: int) -> torch.Generator:
    """The batch order of one client's round: fixed by (seed, client, round), the same in every run."""
    state = np.random.SeedSequence([seed, index, round_number]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    generator: torch.Generator,
    learning_rate: float = LEARNING_RATE,
) -> float:
    """Local training (SGD with momentum, a fresh optimizer each round); the mean batch loss."""
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=MOMENTUM)
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
