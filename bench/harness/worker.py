"""Entry point of one Python load-generator worker process: `python -m harness.worker SPEC RESULT`.

A module of its own so that the pickled WorkerResult names `harness.pyload`, not `__main__`.
"""

from __future__ import annotations

import sys

from harness.pyload import worker_main

if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
