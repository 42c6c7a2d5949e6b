"""cifarlab: one-cycle training of CIFAR-scale ResNets, hyperparameter search and device benchmarks.

The library knows nothing of argparse, Optuna or the terminal; the CLIs in ``studies`` and ``bench`` do.
"""

from cifarlab.errors import CifarlabError, ConfigError, DataError

__version__ = "0.1.0"
__all__ = ["CifarlabError", "ConfigError", "DataError", "__version__"]
