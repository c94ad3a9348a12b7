"""The orchestrator side of MLflow: the life of runs (:mod:`orchestrator.tracking.runs`).

Imports nothing heavy: mlflow loads inside the functions that talk to a store."""
