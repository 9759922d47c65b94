"""paramsel's benchmark: the targets of issue 3, measured side by side. Run ``python -m benchmarks.run``."""
