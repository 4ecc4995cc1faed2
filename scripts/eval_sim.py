#!/usr/bin/env python
"""Wrapper of ``vla_ds.sim.cli.eval_main`` (also the console script vla-eval-sim); see --help."""

import sys

from vla_ds.sim.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
