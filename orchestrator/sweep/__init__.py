"""``orch sweep``: Ray Tune searches over config keys, beside ``orchestrator.kfold``.

:mod:`.space` (the search space), :mod:`.plan` (the typed, checked plan), :mod:`.driver` (the
detached process that runs the Tuner), :mod:`.trial` (what one trial runs), :mod:`.report` (the
MLflow parent run and the trial table). Importing this package is light (no ray, no mlflow).
"""

from orchestrator.sweep.plan import SweepPlan, evaluations, plan_sweep
from orchestrator.sweep.space import Dimension, parse_space, to_tune, trial_count

__all__ = ["Dimension", "SweepPlan", "evaluations", "parse_space", "plan_sweep", "to_tune", "trial_count"]
