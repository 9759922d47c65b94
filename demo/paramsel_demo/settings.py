"""The demo's settings: one run config (``[tool.flwr.app.config]`` in pyproject.toml) read by both apps.

Two runs share the federation, one after the other, from the same seeded model: ``sparse`` exchanges what
the criterion selects, through the paramsel service; ``dense`` is Flower's FedAvg on the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SPARSE_RUN = "sparse"
"""The run exchanging what the chosen criterion selects, through paramsel."""
DENSE_RUN = "dense"
"""The baseline: Flower's FedAvg, the whole model every round."""

COMPACT_PAYLOAD = "paramsel compact payload"
"""What a top-k run exchanges: values and Elias-Fano or bitmap positions (``push_compact``)."""
PACKED_LIST = "FL4Health packed list"
"""What a whole-layer run exchanges: FL4Health's packed list as it is (layers, then the names)."""
STATE_DICT = "Flower ArrayRecord (whole model)"
"""What the dense run exchanges: the model's state as one ArrayRecord."""

SCORE_CRITERIA = (
    "largest_magnitude_change",
    "smallest_magnitude_change",
    "largest_final_magnitude",
    "smallest_final_magnitude",
    "largest_increase_in_magnitude",
    "smallest_increase_in_magnitude",
)
"""Top-k criteria: SparseCooParameterExchanger with ``<name>_scores``; aggregated by aggregate_sparse_coo."""
LAYER_CRITERIA = ("layers_threshold", "layers_percentage")
"""Whole-layer criteria: DynamicLayerExchanger; aggregated by aggregate_layers."""
CRITERIA = SCORE_CRITERIA + LAYER_CRITERIA

RunConfig = Mapping[str, object]


@dataclass(frozen=True)
class DemoSettings:
    """What one demo does; ``ValueError`` for a setting out of range."""

    clients: int = 3
    rounds: int = 10
    sparsity: float = 0.1
    criterion: str = "largest_magnitude_change"
    seed: int = 0
    dense_baseline: bool = True
    local_epochs: int = 3
    skew: float = 0.8
    norm_threshold: float = 0.005

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local epochs must be >= 1, got {self.local_epochs}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}")
        if not self.norm_threshold > 0.0:
            raise ValueError(f"norm threshold must be > 0, got {self.norm_threshold}")

    @classmethod
    def from_run_config(cls, config: RunConfig) -> DemoSettings:
        """The settings a run config holds (the keys of ``[tool.flwr.app.config]``)."""
        return cls(
            clients=_int(config, "num-clients"),
            rounds=_int(config, "num-server-rounds"),
            sparsity=_float(config, "sparsity"),
            criterion=_str(config, "criterion"),
            seed=_int(config, "seed"),
            dense_baseline=_bool(config, "dense-baseline"),
            local_epochs=_int(config, "local-epochs"),
            skew=_float(config, "skew"),
            norm_threshold=_float(config, "norm-threshold"),
        )

    def run_config(self) -> dict[str, int | float | str | bool]:
        """The run config entries of these settings (inverse of :meth:`from_run_config`)."""
        return {
            "num-clients": self.clients,
            "num-server-rounds": self.rounds,
            "sparsity": float(self.sparsity),
            "criterion": self.criterion,
            "seed": self.seed,
            "dense-baseline": self.dense_baseline,
            "local-epochs": self.local_epochs,
            "skew": float(self.skew),
            "norm-threshold": float(self.norm_threshold),
        }

    @property
    def runs(self) -> tuple[str, ...]:
        """The runs, in the order the ServerApp carries them out."""
        return (SPARSE_RUN, DENSE_RUN) if self.dense_baseline else (SPARSE_RUN,)

    def layout(self, run: str) -> str:
        """``"sparse_coo"``, ``"layers"`` or ``"state_dict"``: how ``run``'s payloads are laid out."""
        if run == DENSE_RUN:
            return "state_dict"
        return "sparse_coo" if self.criterion in SCORE_CRITERIA else "layers"

    def payload(self, run: str) -> str:
        """What ``run``'s ClientApps and ServerApp exchange, for the figures."""
        return {"sparse_coo": COMPACT_PAYLOAD, "layers": PACKED_LIST, "state_dict": STATE_DICT}[
            self.layout(run)
        ]

    def describe(self, run: str) -> str:
        if run == DENSE_RUN:
            return "dense FedAvg (whole model)"
        if self.criterion == "layers_threshold":
            return f"layers_threshold (normalized drift > {self.norm_threshold:g})"
        if self.criterion == "layers_percentage":
            return f"layers_percentage ({self.sparsity:g} of the layers)"
        return f"{self.criterion} (sparsity {self.sparsity:g})"


def _get(config: RunConfig, key: str) -> object:
    try:
        return config[key]
    except KeyError:
        raise ValueError(f"the run config has no {key!r}") from None


def _int(config: RunConfig, key: str) -> int:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"run config {key!r} must be an integer, got {value!r}")
    return value


def _float(config: RunConfig, key: str) -> float:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"run config {key!r} must be a number, got {value!r}")
    return float(value)


def _str(config: RunConfig, key: str) -> str:
    value = _get(config, key)
    if not isinstance(value, str):
        raise ValueError(f"run config {key!r} must be a string, got {value!r}")
    return value


def _bool(config: RunConfig, key: str) -> bool:
    value = _get(config, key)
    if not isinstance(value, bool):
        raise ValueError(f"run config {key!r} must be true or false, got {value!r}")
    return value


def run_config_str(config: RunConfig, key: str, default: str = "") -> str:
    """A string entry that may be absent (``default`` then)."""
    return _str(config, key) if key in config else default


def run_config_float(config: RunConfig, key: str, default: float) -> float:
    """A number entry that may be absent (``default`` then)."""
    return _float(config, key) if key in config else default
