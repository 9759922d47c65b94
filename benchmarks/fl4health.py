"""The baseline: the real FL4Health 0.4.2, its own ``SparseCooParameterExchanger``, called in this process.

FL4Health cannot be installed into paramsel's environment (requirements/oracle.txt says why): ``make
bench`` unpacks its wheel into ``.oracle/`` (the Makefile's ``$(ORACLE)`` target, as for the differential
tests) and runs the benchmark with ``PYTHONPATH=.oracle``. Nothing of FL4Health is copied here: this
module only imports it, checks its version and builds its exchanger.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

VERSION = "0.4.2"
HOW = "run `make bench`, which installs FL4Health's wheel into .oracle/ and runs with PYTHONPATH=.oracle"


def version() -> str:
    """The importable FL4Health's version; RuntimeError (saying how to get it) when it is missing or another."""
    try:
        found = importlib.metadata.version("fl4health")
        importlib.import_module("fl4health.parameter_exchange.sparse_coo_parameter_exchanger")
    except (importlib.metadata.PackageNotFoundError, ImportError) as error:
        raise RuntimeError(f"FL4Health {VERSION} is not importable ({error}): {HOW}") from error
    if found != VERSION:
        raise RuntimeError(f"FL4Health {found} found, the baseline is {VERSION}: {HOW}")
    return found


def exchanger(sparsity_level: float) -> Any:
    """FL4Health's ``SparseCooParameterExchanger(sparsity_level, largest_magnitude_change_scores)``.

    Its per-push INFO line (through Flower's logger) is silenced; the work is unchanged.
    """
    version()
    exchange = importlib.import_module("fl4health.parameter_exchange.sparse_coo_parameter_exchanger")
    criteria = importlib.import_module("fl4health.parameter_exchange.parameter_selection_criteria")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return exchange.SparseCooParameterExchanger(sparsity_level, criteria.largest_magnitude_change_scores)
