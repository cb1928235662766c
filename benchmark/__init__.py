"""ensemble-bench: the harness shared by every method (data, backbones, trainer, metrics, cost, results)."""

__version__ = "0.1.0"
