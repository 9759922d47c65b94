"""Run by test_memory_returned.py in a process of its own: one push of 40 M parameters, in process or to
the server at argv[3] when given, then the process's RSS (VmRSS) every 0.1 s for up to argv[1] seconds,
until it is back within argv[2] MB of what it was before the push, as JSON on stdout."""

import gc
import json
import os
import sys
import time

import torch
from support import proc_status  # tests/ is on PYTHONPATH (test_memory_returned.py puts it there)

from paramsel.client import Client, ScoreFunction, TopK


def rss() -> int:
    return proc_status(os.getpid(), "VmRSS")


g = torch.Generator().manual_seed(0)
model = {"w": torch.randn(40_000_000, generator=g)}
initial = {"w": torch.randn(40_000_000, generator=g)}
client = Client(target=sys.argv[3]) if len(sys.argv) > 3 else Client()
criterion = TopK(0.1, ScoreFunction.LARGEST_MAGNITUDE_CHANGE)
client.push(criterion, {"w": model["w"][:1000]}, {"w": initial["w"][:1000]})
gc.collect()
before = rss()
result = client.push(criterion, model, initial)
del result
gc.collect()
after = rss()
seen = [(0.0, after)]
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[1]):
    time.sleep(0.1)
    seen.append((time.monotonic() - start, rss()))
    if seen[-1][1] < before + float(sys.argv[2]) * 2**20:
        break
print(json.dumps({"before": before, "after": after, "seen": seen}))
