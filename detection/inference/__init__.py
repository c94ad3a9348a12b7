"""Prediction with a trained checkpoint outside training: ``orch predict`` on images, folders,
globs and videos (:mod:`~detection.inference.run`), and ``orch eval --format-only`` for
evaluation servers (:mod:`~detection.inference.format_only`).

Modules: ``sources`` (inputs and the image dataset), ``video`` (PyAV reader/writer), ``classes``
(label map: training annotation file or checkpoint; ``--image-info``), ``model`` (the detector
of a checkpoint), ``draw``, ``outputs`` (atomic, streamed results files), ``progress``.
"""

from detection.inference.format_only import FormatSummary, format_results
from detection.inference.model import Predictor, load_predictor
from detection.inference.run import PredictSummary, predict_sources
from detection.inference.sources import Source, resolve_sources

__all__ = ["FormatSummary", "PredictSummary", "Predictor", "Source", "format_results", "load_predictor",
           "predict_sources", "resolve_sources"]
