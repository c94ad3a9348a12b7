"""orch: one YAML experiment file, detection training wherever the compute is.

Importing this package (and ``orchestrator.cli``) must not import torch, ray, mlflow or submitit.
"""

__version__ = "0.1.0"
