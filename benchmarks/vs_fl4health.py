"""Issue 14's comparison: the real FL4Health 0.4.2 against paramsel's drop-in SDK, side by side.

The same call an FL4Health client makes, ``push_parameters(model, initial_model, config)``, on issue
14's 50.1M-parameter model (:func:`benchmarks.models.conv_linear_pair`), with
``SparseCooParameterExchanger(0.1, largest_magnitude_change_scores)``: FL4Health's own (its wheel, in
this process; :mod:`benchmarks.fl4health`), then paramsel's, three ways:

- ``first``: against a separately started ``paramsel serve`` that does not hold the initial model yet
  (the SDK names it by digest, is told to send it, and uploads both models);
- ``cached``: the same exchanger pushing again with the same initial model (only the model goes up);
- ``embedded``: the SDK with no target (whatever it does then: an embedded server, or in process), in a
  process of its own that keeps its state between rounds, as a user's client would
  (:mod:`benchmarks.embedded_worker`).

The SDK's calls keep the memory they free for the next call, for the whole process, until it has been
idle a minute (:data:`paramsel.wire.memory.KEPT`). FL4Health's push is measured as its users run it,
with glibc's defaults: each round gives the kept memory back and restores them first (``KEPT.release()``,
not timed), so the first remote push of a round starts from the defaults too.

They run in rounds, one push of each per round, so that the machine's drift touches all alike; the
first round is a warm-up. Each round gives the initial model a new value at one entry (a new round's
initial model in federated terms), so that ``first`` really is the server's first sight of it. Every
paramsel result is checked against FL4Health's of the same round: same arrays (dtype, shape, bytes),
same names. The ratios are FL4Health's median over paramsel's median; their spread is over rounds.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from benchmarks import fl4health
from benchmarks.config import Sizes
from benchmarks.models import conv_linear_pair, digest, new_round, sent_values, state_bytes, state_entries
from benchmarks.procs import ROOT, paramsel_serve
from benchmarks.report import Row, spread, spread_text
from paramsel.client import ENV_TARGET, SparseCooParameterExchanger, largest_magnitude_change_scores
from paramsel.wire.memory import KEPT

SPARSITY = 0.1
SEED = 14
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


class _EmbeddedWorker:
    """:mod:`benchmarks.embedded_worker`: the embedded default in a process of its own, without
    $PARAMSEL_TARGET (no target means the SDK's own default); its stderr goes to a file."""

    def __init__(self, width: int, seed: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != ENV_TARGET}
        self._log = log
        cmd = [sys.executable, "-m", "benchmarks.embedded_worker", str(width), str(seed)]
        with log.open("w") as err:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env
            )
        self._read()  # "ready": the models are built

    def _read(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the embedded worker ended: {self._log.read_text()[-2000:]}")
        return line

    def push(self, round_: int) -> tuple[float, str]:
        """(seconds, digest) of the round's push."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{round_}\n")
        self._proc.stdin.flush()
        answer = json.loads(self._read())
        return float(answer["seconds"]), str(answer["digest"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _timed(push: Callable[..., list[Any]], *args: Any) -> tuple[float, list[Any]]:
    gc.collect()
    start = time.perf_counter()
    packed = push(*args)
    return time.perf_counter() - start, packed


def _rounds(
    rounds: int,
    target: str,
    embedded: _EmbeddedWorker,
    model: nn.Module,
    initial: nn.Module,
    seconds: dict[str, list[float]],
    mismatches: list[str],
) -> int:
    """The timed rounds (round 0, a warm-up, is not counted); returns how many values a push sends."""
    baseline = fl4health.exchanger(SPARSITY)
    remote = SparseCooParameterExchanger(SPARSITY, largest_magnitude_change_scores, target=target)
    sent = 0
    for round_ in range(rounds + 1):
        new_round(initial, round_)
        config = {"current_server_round": round_ + 1}
        took: dict[str, float] = {}
        KEPT.release()  # glibc's defaults for FL4Health (see the module's notes)
        took["fl4health"], expected = _timed(baseline.push_parameters, model, initial, config)
        took["embedded"], ours_digest = embedded.push(round_)
        if ours_digest != digest(expected):
            mismatches.append(f"round {round_} embedded: arrays differ from FL4Health's")
        took["first"], ours = _timed(remote.push_parameters, model, initial, config)
        mismatches += [f"round {round_} first{d}" for d in differences(ours, expected)]
        took["cached"], ours = _timed(remote.push_parameters, model, initial, config)
        mismatches += [f"round {round_} cached{d}" for d in differences(ours, expected)]
        sent = sent_values(expected)
        del ours, expected
        if round_:
            for key, value in took.items():
                seconds[key].append(value)
    return sent


def run(sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    model, initial = conv_linear_pair(sizes.fl4health_width, seed=SEED)
    entries = state_entries(model)
    model_bytes = state_bytes(model)
    label = f"{entries / 1e6:.1f}M params"
    seconds: dict[str, list[float]] = {"fl4health": [], **{mode: [] for mode in MODES}}
    mismatches: list[str] = []
    with paramsel_serve() as server, tempfile.TemporaryDirectory() as logs:
        embedded = _EmbeddedWorker(sizes.fl4health_width, SEED, Path(logs) / "embedded.log")
        try:
            sent = _rounds(
                sizes.fl4health_rounds, server.target, embedded, model, initial, seconds, mismatches
            )
        finally:
            embedded.close()
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
