#!/usr/bin/env python
"""Wrapper of ``vla_ds.sim.cli.record_main`` (also the console script vla-record-sim); see --help."""

import sys

from vla_ds.sim.cli import record_main

if __name__ == "__main__":
    sys.exit(record_main())
