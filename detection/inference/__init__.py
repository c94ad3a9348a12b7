"""Prediction with a trained checkpoint outside training: ``orch predict`` on images, folders,
globs and videos (:mod:`~detection.inference.run`), and ``orch eval --format-only`` for
evaluation servers (:mod:`~detection.inference.format_only`).

Modules: ``sources`` (inputs and the image dataset), ``video`` (PyAV reader/writer), ``classes``
(label map: training annotation file or checkpoint; ``--image-info``), ``model`` (the detector
of a checkpoint), ``draw``, ``outputs`` (atomic, streamed results files), ``progress``.
"""

import os

# Before torch loads, as in detection.train: spinning OpenMP waiters collapse throughput on a
# shared, oversubscribed machine. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from detection.inference.format_only import FormatSummary, format_results  # noqa: E402
from detection.inference.model import Predictor, load_predictor  # noqa: E402
from detection.inference.run import PredictSummary, predict_sources  # noqa: E402
from detection.inference.sources import Source, resolve_sources  # noqa: E402

__all__ = ["FormatSummary", "PredictSummary", "Predictor", "Source", "format_results", "load_predictor",
           "predict_sources", "resolve_sources"]
