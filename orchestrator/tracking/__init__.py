"""The orchestrator side of MLflow: shipping run journals to tracking stores.

Training appends what it wants recorded to a journal folder (``detection.journal``); these
modules replay journals to MLflow, beside training or later:

- ``shipper``: ``ship(journal_dir, uri)``, ``ship_forever(...)`` and the shipper process
  ``python -m orchestrator.tracking.shipper JOURNAL_DIR --uri URI [--follow]``;
- ``sync``: ``sync(paths, uri)`` behind ``orch sync`` (every journal under a folder, parents
  first, idempotent);
- ``cursor``: per-destination progress in ``<journal>/cursors/``; ``replay``: one pass;
  ``store``: MLflow clients, experiments and run lookup.

Nothing here imports mlflow at import time.
"""
