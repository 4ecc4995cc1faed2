"""What acts on a finished run or policy: checkpoint conversion and export (``convert``),
open-loop evaluation on recorded episodes (``evaluate``) and one-chunk prediction
(``predict``). Closed-loop evaluation in simulation is ``vla_ds.sim``."""
