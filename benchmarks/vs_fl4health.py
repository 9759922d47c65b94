"""Issue 14's comparison: the real FL4Health 0.4.2 against paramsel's drop-in SDK, side by side.

The same call an FL4Health client makes, ``push_parameters(model, initial_model, config)``, on issue
14's 50.1M-parameter model (:func:`benchmarks.models.conv_linear_pair`), with
``SparseCooParameterExchanger(0.1, largest_magnitude_change_scores)``: FL4Health's own (its wheel, in
this process; :mod:`benchmarks.fl4health`), then paramsel's, three ways:

- ``first``: against a separately started ``paramsel serve`` that does not hold the initial model yet
  (the SDK names it by digest, is told to send it, and uploads both models);
- ``cached``: the same exchanger pushing again with the same initial model (only the model goes up);
- ``embedded``: the SDK with no target (whatever it does then: an embedded server, or in process).

They run in rounds, one push of each per round, so that the machine's drift touches all alike; the
first round is a warm-up. Each round gives the initial model a new value at one entry (a new round's
initial model in federated terms), so that ``first`` really is the server's first sight of it. Every
paramsel result is checked against FL4Health's of the same round: same arrays (dtype, shape, bytes),
same names. The ratios are FL4Health's median over paramsel's median; their spread is over rounds.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks import fl4health
from benchmarks.config import Sizes
from benchmarks.models import conv_linear_pair, sent_values, state_bytes, state_entries
from benchmarks.procs import paramsel_serve
from benchmarks.report import Row, spread, spread_text
from paramsel.client import ENV_TARGET, SparseCooParameterExchanger, largest_magnitude_change_scores

SPARSITY = 0.1
MODES = ("cached", "first", "embedded")
# The minimums: FL4Health's push time over paramsel's.
MINIMUM = {"cached": 20.0, "first": 10.0, "embedded": 40.0}
TITLES = {
    "cached": "remote serve, initial model cached (2nd push)",
    "first": "remote serve, first push (both models up)",
    "embedded": "embedded default (no target)",
}


def differences(ours: list[Any], theirs: list[Any]) -> list[str]:
    """How two packed lists differ (empty when they are the same arrays: type, dtype, shape, bytes)."""
    if len(ours) != len(theirs):
        return [f"{len(ours)} arrays, FL4Health {len(theirs)}"]
    found = []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            found.append(f"[{i}]: {type(a).__name__}, FL4Health {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            found.append(f"[{i}]: {a.dtype}{a.shape}, FL4Health {b.dtype}{b.shape}")
        elif a.dtype.kind in "USO":
            if a.tolist() != b.tolist():
                found.append(f"[{i}]: names {a.tolist()}, FL4Health {b.tolist()}")
        elif np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():
            found.append(f"[{i}]: different values")
    return found


@contextmanager
def _no_target() -> Iterator[None]:
    """$PARAMSEL_TARGET unset for the block, so that no target means the SDK's own default."""
    saved = os.environ.pop(ENV_TARGET, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_TARGET] = saved


@torch.no_grad()
def _new_round(initial: nn.Module, round_: int) -> None:
    """A new value at one entry of the initial model (a different entry each round)."""
    first = next(iter(initial.state_dict().values())).view(-1)
    first[round_ % first.numel()] += 0.001


def _timed(push: Callable[..., list[Any]], *args: Any) -> tuple[float, list[Any]]:
    gc.collect()
    start = time.perf_counter()
    packed = push(*args)
    return time.perf_counter() - start, packed


def run(sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    baseline = fl4health.exchanger(SPARSITY)
    model, initial = conv_linear_pair(sizes.fl4health_width, seed=14)
    entries = state_entries(model)
    model_bytes = state_bytes(model)
    label = f"{entries / 1e6:.1f}M params"
    seconds: dict[str, list[float]] = {"fl4health": [], **{mode: [] for mode in MODES}}
    mismatches: list[str] = []
    sent = 0
    with paramsel_serve() as server, _no_target():
        remote = SparseCooParameterExchanger(SPARSITY, largest_magnitude_change_scores, target=server.target)
        embedded = SparseCooParameterExchanger(SPARSITY, largest_magnitude_change_scores)
        for round_ in range(sizes.fl4health_rounds + 1):  # round 0 is the warm-up
            _new_round(initial, round_)
            config = {"current_server_round": round_ + 1}
            took: dict[str, float] = {}
            took["fl4health"], expected = _timed(baseline.push_parameters, model, initial, config)
            took["embedded"], ours = _timed(embedded.push_parameters, model, initial, config)
            mismatches += [f"round {round_} embedded{d}" for d in differences(ours, expected)]
            took["first"], ours = _timed(remote.push_parameters, model, initial, config)
            mismatches += [f"round {round_} first{d}" for d in differences(ours, expected)]
            took["cached"], ours = _timed(remote.push_parameters, model, initial, config)
            mismatches += [f"round {round_} cached{d}" for d in differences(ours, expected)]
            sent = sent_values(expected)
            del ours, expected
            if round_:
                for key, value in took.items():
                    seconds[key].append(value)
    del model, initial
    gc.collect()

    spreads = {key: spread(values) for key, values in seconds.items()}
    base = spreads["fl4health"]["median"]
    # Per round: FL4Health's push time over each of paramsel's in the same round.
    per_round = {
        mode: spread([f / p for f, p in zip(seconds["fl4health"], seconds[mode], strict=True)])
        for mode in MODES
    }
    agree = not mismatches
    rows = [
        Row(
            "fl4health_push_time",
            f"1. FL4Health 0.4.2 push, {label} (median)",
            base,
            "s",
            note=f"the real wheel, in process; {spread_text(spreads['fl4health'], 's')}; {sent:,} values",
        )
    ]
    for mode in MODES:
        ratio = base / spreads[mode]["median"]
        minimum = MINIMUM[mode]
        rows.append(
            Row(
                f"fl4health_vs_{mode}",
                f"1. FL4Health push / paramsel {TITLES[mode]}",
                ratio,
                "x",
                minimum=minimum,
                verdict="" if agree else "MISS",
                note=(
                    f"paramsel {spread_text(spreads[mode], 's')}; per-round ratio "
                    f"{spread_text(per_round[mode], 'x')}; same arrays as FL4Health: {agree}"
                ),
            )
        )
    figures = {
        "fl4health_version": fl4health.version(),
        "model": "Conv2d(3, 64, 3), Conv2d(64, 128, 3), 4 x Linear(width, width)",
        "width": sizes.fl4health_width,
        "state_entries": entries,
        "model_bytes": model_bytes,
        "sparsity_level": SPARSITY,
        "sent_values": sent,
        "rounds": sizes.fl4health_rounds,
        "seconds": spreads,
        "ratio_of_medians": {mode: base / spreads[mode]["median"] for mode in MODES},
        "ratio_per_round": per_round,
        "minimum_ratio": MINIMUM,
        "same_arrays_as_fl4health": agree,
        "mismatches": mismatches[:20],
    }
    return rows, figures
