"""The sink interface: where records go. Sinks present; they never compute."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType

from ..record import Record


class Sink:
    """Receives the recorder's records.

    ``start`` gets the optimizer's configuration once (flat strings), ``write``
    one batch of records per emission, ``flush`` pushes buffers out, ``close``
    releases files, servers and runs. Only ``write`` is required.
    """

    def start(self, config: Mapping[str, str]) -> None:
        """Called once, when the recorder attaches."""

    def write(self, records: Sequence[Record]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered records out."""

    def close(self) -> None:
        """Flush and release resources; the sink is not used afterwards."""
        self.flush()


def require(module: str, extra: str, sink: str) -> ModuleType:
    """Import an optional dependency, or fail with the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{sink} needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed: pip install 'gradguard[{extra}]'") from err
