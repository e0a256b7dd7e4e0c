"""Scaling-law experiments: plan a ladder of runs, run it, fit the laws, plot them.

- :mod:`.shapes`: the width/depth/heads rule that turns a parameter count N into a model shape,
  and exact parameter counts (non-embedding and total) from a config.
- :mod:`.flops`: training FLOPs per token (the trainer's accounting, attention included).
- :mod:`.plan`: sweep files (IsoFLOP, fixed-N token sweep, LR x size grid), one resolved config per row.
- :mod:`.run`: runs the rows (local subprocesses K at a time, or a SLURM job array), resumes, records results.
- :mod:`.fit`: Chinchilla's approaches 1, 2 and 3 (:mod:`.parametric` holds approach 3).
- :mod:`.plot`: the figures; :mod:`.lr_sensitivity`: the LR-sensitivity measure of Wortsman et al.
"""

from ..errors import MeshforgeError


class ScalingError(MeshforgeError, ValueError):
    """A sweep or results file that cannot be planned, run or fitted (says what to change)."""
