"""The embedded default (no target) as a user's client runs it: in a process of its own, which keeps
its state from round to round (issue 14's comparison, :mod:`benchmarks.vs_fl4health`).

``python -m benchmarks.embedded_worker WIDTH SEED`` builds the same model pair as the parent
(:func:`benchmarks.models.conv_linear_pair` is deterministic in its seed), prints ``ready``, then for
each round number read from stdin gives the initial model that round's new value
(:func:`benchmarks.models.new_round`), pushes, and prints one JSON line: the push's seconds and the
digest of the packed list it returned (:func:`benchmarks.models.digest`).

In a process of its own, as a user's client has one way of calling: the SDK keeps the memory its calls
free for the whole process while calls keep coming (:data:`paramsel.wire.memory.KEPT`), and the parent
gives it back before each of FL4Health's pushes, which run with glibc's defaults as they do for their
users.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from benchmarks.models import conv_linear_pair, digest, new_round
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

SPARSITY = 0.1


def main(argv: list[str]) -> None:
    width, seed = int(argv[0]), int(argv[1])
    model, initial = conv_linear_pair(width, seed=seed)
    exchanger = SparseCooParameterExchanger(SPARSITY, largest_magnitude_change_scores)
    print("ready", flush=True)
    for line in sys.stdin:
        round_ = int(line)
        new_round(initial, round_)
        config = {"current_server_round": round_ + 1}
        gc.collect()
        start = time.perf_counter()
        packed = exchanger.push_parameters(model, initial, config)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "digest": digest(packed)}), flush=True)
        del packed


if __name__ == "__main__":
    main(sys.argv[1:])
