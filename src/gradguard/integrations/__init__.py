"""gradguard.integrations: the flight recorder and the guard inside training frameworks.

* :mod:`gradguard.integrations.lightning`: ``GradguardCallback`` for PyTorch
  Lightning (``pip install 'gradguard[lightning]'``);
* :mod:`gradguard.integrations.transformers`: ``GradguardTrainerCallback`` for the
  Hugging Face ``Trainer`` (``pip install 'gradguard[transformers]'``).

Importing this package imports neither framework; importing a submodule whose
framework is missing raises an ImportError that names the extra to install.
See ``docs/integrations.md``.
"""

from ._common import GuardedStep, MetricBuffer, flatten

__all__ = ["GuardedStep", "MetricBuffer", "flatten"]
