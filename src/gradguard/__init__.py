"""gradguard: gradient-descent optimizers for PyTorch that you can operate in production."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradguard")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
