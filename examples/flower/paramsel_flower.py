"""Flower with paramsel: sparse parameter exchange and sparse FedAvg served over gRPC.

- ``DigitsClient`` is a Flower ``NumPyClient``. Its ``fit`` pulls the global parameters into the model
  with paramsel's drop-in ``SparseCooParameterExchanger``, trains a few steps on its shard of
  scikit-learn's digits, and returns ``push_parameters`` (FL4Health's packed list: values, COO indices,
  shapes, names) for the top ``sparsity`` fraction of parameters by ``largest_magnitude_change``.
- ``ParamselFedAvg`` is Flower's ``FedAvg`` with ``aggregate_fit`` replaced: each ``FitRes``'s packed
  list and ``num_examples`` go to ``paramsel.client.aggregate_sparse_coo`` (FL4Health's
  FedAvgSparseCooTensor rule, computed by the paramsel service) and the aggregate is the new global
  parameters. The initial parameters are the whole model as a packed list (sparsity 1.0).
- ``run`` starts Flower's gRPC server (``flwr.server.start_server``) on loopback in this thread and the
  clients (``start_client``) in threads, all in this one process; no Ray.

Run it against a paramsel server (``paramsel serve`` listens on 127.0.0.1:50051 by default)::

    python examples/flower/paramsel_flower.py --target 127.0.0.1:50051 --clients 2 --rounds 3

Without ``--target`` (and without ``$PARAMSEL_TARGET``) the SDK runs the service in the process itself.
``start_server`` registers signal handlers, so ``run`` must be called from the main thread.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Flower reports usage events to its developers unless told not to; this example does not.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import (
    FitRes,
    Metrics,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.client.app import start_client
from flwr.server import ServerConfig, start_server
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from sklearn.datasets import load_digits
from torch import nn

from paramsel.client import (
    SparseCooParameterExchanger,
    aggregate_sparse_coo,
    largest_magnitude_change_scores,
)

NDArrays = list[np.ndarray]


class DigitsMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_model(seed: int = 0) -> DigitsMlp:
    torch.manual_seed(seed)
    return DigitsMlp()


def load_partition(index: int, clients: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Client ``index``'s training shard and its own held-out examples (x_train, y_train, x_test, y_test)."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    part = order[index::clients]
    cut = int(0.8 * len(part))
    return x[part[:cut]], y[part[:cut]], x[part[cut:]], y[part[cut:]]


def initial_parameters(seed: int = 0) -> NDArrays:
    """The whole initial model as FL4Health's sparse COO packed list (every entry selected).

    Scores against an all-zero "initial model", so every entry ranks by its magnitude; ``exact_k``
    makes sparsity 1.0 take exactly all of them, zeros included.
    """
    model = make_model(seed)
    zeros = make_model(seed)
    with torch.no_grad():
        for p in zeros.parameters():
            p.zero_()
    exchanger = SparseCooParameterExchanger(
        sparsity_level=1.0, score_gen_function=largest_magnitude_change_scores, exact_k=True
    )
    return exchanger.push_parameters(model, zeros)


class DigitsClient(NumPyClient):
    """A Flower client whose exchange is paramsel's drop-in ``SparseCooParameterExchanger``."""

    def __init__(
        self,
        index: int,
        clients: int,
        *,
        target: str | None,
        sparsity: float = 0.1,
        steps: int = 20,
        lr: float = 0.5,
    ) -> None:
        self.model = make_model(0)
        self.initial_model = make_model(0)
        self.x_train, self.y_train, self.x_test, self.y_test = load_partition(index, clients)
        self.steps = steps
        self.lr = lr
        # pull_mode="scatter": coordinates nobody sent keep their local values (FL4Health's default,
        # "replace", zeroes them, which suits aggregates that cover the whole model).
        self.exchanger = SparseCooParameterExchanger(
            sparsity_level=sparsity,
            score_gen_function=largest_magnitude_change_scores,
            target=target,
            pull_mode="scatter",
        )

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self.exchanger.push_parameters(self.model, self.initial_model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.exchanger.pull_parameters(parameters, self.model)
        self.initial_model.load_state_dict(self.model.state_dict())
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x_train), self.y_train).backward()
            optimizer.step()
        packed = self.exchanger.push_parameters(self.model, self.initial_model)
        return packed, len(self.y_train), {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        self.exchanger.pull_parameters(parameters, self.model)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.x_test)
            loss = float(nn.functional.cross_entropy(logits, self.y_test))
            accuracy = float((logits.argmax(1) == self.y_test).float().mean())
        return loss, len(self.y_test), {"accuracy": accuracy}


def weighted_accuracy(metrics: list[tuple[int, Metrics]]) -> Metrics:
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * float(m["accuracy"]) for n, m in metrics) / total}


class ParamselFedAvg(FedAvg):
    """FedAvg whose fit aggregation is FL4Health's FedAvgSparseCooTensor, computed by paramsel."""

    def __init__(self, *, target: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.service_calls = 0

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results or (failures and not self.accept_failures):
            return None, {}
        packed = [(parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        aggregated = aggregate_sparse_coo(packed, weighted=True, target=self.target)
        self.service_calls += 1
        return ndarrays_to_parameters(aggregated), {"paramsel_calls": self.service_calls}


@dataclass
class RunResult:
    rounds: int
    service_calls: int
    losses: list[float] = field(default_factory=list)
    """Weighted client evaluation loss after each round."""
    accuracies: list[float] = field(default_factory=list)
    initial_loss: float = 0.0
    initial_accuracy: float = 0.0
    seconds: float = 0.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _initial_metrics(seed: int, clients: int) -> tuple[float, float]:
    """The initial model's weighted loss and accuracy on the clients' held-out examples."""
    model = make_model(seed)
    model.eval()
    loss_sum, correct, total = 0.0, 0.0, 0
    with torch.no_grad():
        for index in range(clients):
            _, _, x, y = load_partition(index, clients)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / total, correct / total


def run(
    *, target: str | None = None, clients: int = 2, rounds: int = 3, sparsity: float = 0.1, port: int = 0
) -> RunResult:
    """A whole Flower run over loopback gRPC: the server here, each client in its own thread."""
    started = time.perf_counter()
    address = f"127.0.0.1:{port or _free_port()}"
    strategy = ParamselFedAvg(
        target=target,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=clients,
        min_evaluate_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(initial_parameters()),
        evaluate_metrics_aggregation_fn=weighted_accuracy,
    )
    errors: list[BaseException] = []

    def client_main(index: int) -> None:
        try:
            numpy_client = DigitsClient(index, clients, target=target, sparsity=sparsity)
            start_client(
                server_address=address,
                client_fn=lambda _context: numpy_client.to_client(),
                insecure=True,
                max_wait_time=60,
            )
        except BaseException as exc:  # surfaced by run()
            errors.append(exc)

    threads = [threading.Thread(target=client_main, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    history = start_server(server_address=address, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise RuntimeError(f"a Flower client failed: {errors[0]!r}") from errors[0]
    initial_loss, initial_accuracy = _initial_metrics(0, clients)
    return RunResult(
        rounds=len(history.losses_distributed),
        service_calls=strategy.service_calls,
        losses=[float(loss) for _, loss in history.losses_distributed],
        accuracies=[float(a) for _, a in history.metrics_distributed.get("accuracy", [])],
        initial_loss=initial_loss,
        initial_accuracy=initial_accuracy,
        seconds=time.perf_counter() - started,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", default=None, help="paramsel server host:port (default: $PARAMSEL_TARGET)"
    )
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=0, help="Flower server port (default: a free one)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    result = run(
        target=args.target, clients=args.clients, rounds=args.rounds, sparsity=args.sparsity, port=args.port
    )
    print(f"round 0: loss {result.initial_loss:.4f} accuracy {result.initial_accuracy:.4f}")
    for number, (loss, accuracy) in enumerate(zip(result.losses, result.accuracies, strict=True), 1):
        print(f"round {number}: loss {loss:.4f} accuracy {accuracy:.4f}")
    print(f"{result.service_calls} aggregations through paramsel, {result.seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.__dict__, f)


if __name__ == "__main__":
    main()
