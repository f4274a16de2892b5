"""cxr-automl: compose a chest X-ray backbone, a task head and a training strategy; search how to adapt them.

Layers, each a subpackage (README "Architecture in five minutes"):

- ``plugin``: what a component must provide (interfaces), how one is found (registry), which combinations fit
  (compat), helpers for plugin authors (weights, targets) and the contract suites (testing).
- ``data``: records, image decoding and caching, splits; what every dataset loader builds on.
- ``config``: composing a run's configuration from the Hydra groups in ``config/conf``.
- ``train``: the one training loop, its step, callbacks, checkpoints, model composition, evaluation.
- ``hpo``: Optuna studies over training runs: search spaces, pruning, workers, storage, launch, summary, report.
- ``cli``: the ``cxr-automl`` command and its terminal rendering.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxr-automl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
