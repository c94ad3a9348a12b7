"""The orchestrator side of MLflow.

Training never talks to a tracking server: rank 0 appends what MLflow should record to a journal
in the job's output folder (:mod:`detection.journal`). Here: the life of runs and their journals
(:mod:`.runs`: which experiment, create, nest, close), the replay of a journal to a tracking URI
exactly once (:mod:`.shipper`, :mod:`.replay`, :mod:`.cursor`, :mod:`.store`), the one shipper
process per host that replays every registered journal (:mod:`.host_shipper`, :mod:`.registry`;
what waits: :mod:`.pending`), and ``orch sync`` (:mod:`.sync`). Imports nothing heavy: mlflow
loads inside the functions that talk to a store.
"""
