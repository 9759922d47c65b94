"""A federated client written against FL4Health's sparse-exchange API.

``client_fl4health.py`` imports FL4Health and runs where FL4Health is installed; ``client.py`` is the
same file with only the FL4Health import lines swapped for paramsel's (``tests/client/
test_dropin_example.py`` checks that nothing else differs). With paramsel, the server is
``$PARAMSEL_TARGET`` when set, else the service runs in this process.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores


class Net(nn.Module):
    """A small classifier with a BatchNorm, so the state has buffers and an int64 0-d counter too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_shard(seed: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic, client-specific data shard: 3 classes separated along random directions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0] * 8, [-2.0] * 8, [2.0, -2.0] * 4])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centres[y] + torch.randn(n, 8, generator=g)
    return x, y


class SparseClient:
    """Per round: load the global model, train locally, push the top 10 % of changed parameters."""

    def __init__(self, seed: int, sparsity_level: float = 0.1) -> None:
        torch.manual_seed(seed)
        self.model = Net()
        self.x, self.y = make_shard(seed)
        self.initial_model = Net()
        self.parameter_exchanger = SparseCooParameterExchanger(
            sparsity_level=sparsity_level, score_gen_function=largest_magnitude_change_scores
        )

    def loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(self.model(self.x), self.y))

    def fit(self, parameters: list[np.ndarray] | None, steps: int = 20) -> tuple[list[np.ndarray], int]:
        if parameters is not None:
            self.parameter_exchanger.pull_parameters(parameters, self.model)
        self.initial_model.load_state_dict(self.model.state_dict())
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            optimizer.step()
        return self.parameter_exchanger.push_parameters(self.model, self.initial_model), len(self.y)


def fedavg_sparse(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """FedAvgSparseCooTensor's rule: densify each client's tensors, weight by examples, re-sparsify."""
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, int] = {}
    for packed, examples in results:
        n = (len(packed) - 1) // 3
        values, indices, shapes, names = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], packed[-1]
        for value, index, shape, name in zip(values, indices, shapes, names.tolist(), strict=True):
            dense = np.zeros(tuple(shape), dtype=np.float64)
            dense[tuple(index.T)] = value
            sums[name] = sums.get(name, 0) + dense * examples
            weights[name] = weights.get(name, 0) + examples
    out_values, out_indices, out_shapes, out_names = [], [], [], []
    for name, total in sums.items():
        mean = (total / weights[name]).astype(np.float32)
        index = np.argwhere(mean != 0)
        out_values.append(mean[tuple(index.T)])
        out_indices.append(index.astype(np.int64))
        out_shapes.append(np.array(mean.shape, dtype=np.int64))
        out_names.append(name)
    return [*out_values, *out_indices, *out_shapes, np.array(out_names)]


def run(clients: int = 2, rounds: int = 3) -> list[float]:
    """A whole federated run; returns the mean client loss before training and after each round."""
    fleet = [SparseClient(seed) for seed in range(clients)]
    losses = [sum(c.loss() for c in fleet) / clients]
    global_parameters = None
    for _ in range(rounds):
        results = [client.fit(global_parameters) for client in fleet]
        global_parameters = fedavg_sparse(results)
        losses.append(sum(c.loss() for c in fleet) / clients)
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_number, loss in enumerate(run(args.clients, args.rounds)):
        print(f"round {round_number}: mean client loss {loss:.4f}")
