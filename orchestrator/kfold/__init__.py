"""K-fold cross-validation for detection: leak-free splits, grid x folds expansion, launch and
aggregation (``orch split``, ``orch kfold``, ``orch report``).

Importing this package is light (no torch, mlflow, numpy or scikit-learn); those load inside the
functions that need them.
"""

from orchestrator.kfold.expand import Trial, expand
from orchestrator.kfold.split import (
    FoldSplit,
    balance_table,
    check_folds,
    read_folds,
    split_folds,
    verify_folds,
    write_folds,
)

__all__ = [
    "FoldSplit",
    "Trial",
    "balance_table",
    "check_folds",
    "expand",
    "read_folds",
    "split_folds",
    "verify_folds",
    "write_folds",
]
