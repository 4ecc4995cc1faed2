"""Closed-loop evaluation in simulation (``pip install -e ".[sim]"``: Meta-World, MuJoCo, gymnasium).

- :mod:`vla_ds.sim.metaworld`: Meta-World with LeRobot's observation protocol, tasks and groups.
- :mod:`vla_ds.sim.envs`: environments in worker processes, stepped in lockstep.
- :mod:`vla_ds.sim.policies`: what acts (a vla_ds policy in-process or through a server, the
  scripted expert, zero actions).
- :mod:`vla_ds.sim.evaluate`: rollouts, eval_info.json, videos, plots (``vla-eval-sim``).
- :mod:`vla_ds.sim.record`: expert demonstrations as a LeRobot v3.0 dataset (``vla-record-sim``).

Nothing in the rest of vla_ds imports this package; it imports Meta-World only in the
environment worker processes.
"""
