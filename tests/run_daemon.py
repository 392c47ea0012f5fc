"""Test entry point: ``python -m tests.run_daemon CONFIG [--delay S]``.

The real daemon, with the only stand-in at the model boundary: the motion backend slowed down
by ``--delay`` seconds per call (a slow model on a small machine).
"""

from __future__ import annotations

import argparse

from streamd.config import load_config
from streamd.daemon import run
from streamd.log import setup_logging
from tests.slow_backend import SlowBackend


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    setup_logging("debug")  # tests wait for per-window lines
    config = load_config(args.config)
    return run(config, backend=SlowBackend(delay_s=args.delay))


if __name__ == "__main__":
    raise SystemExit(main())
