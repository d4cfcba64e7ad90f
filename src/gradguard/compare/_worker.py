"""A compare worker process: reads one task per line on stdin, answers one result per line.

``python -m gradguard.compare._worker`` is started by
:func:`gradguard.compare.experiment.run_compare` (not by ``multiprocessing``, so
the caller's ``__main__`` is never re-imported: a script or notebook that calls
``run_compare`` needs no ``if __name__ == "__main__"`` guard). The protocol
stream is a private copy of stdout; the process's own stdout goes to stderr, so
a stray print cannot corrupt it. SIGINT is ignored between tasks; while a task
trains, the runner's own handler turns Ctrl-C / SIGTERM into a clean stop with
a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> int:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from gradguard.compare.experiment import execute

    for line in sys.stdin:
        if not line.strip():
            continue
        result = execute(json.loads(line))
        protocol.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
