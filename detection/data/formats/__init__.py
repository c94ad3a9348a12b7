"""Readers of the annotation formats ``orch data convert`` takes: Pascal VOC XML, YOLO text
labels, LabelMe JSON. Each returns a :class:`~detection.data.formats.base.Source` of samples in
COCO's 0-based continuous xywh coordinates; :mod:`detection.data.convert` writes them as COCO.
Standard library + Pillow only (PyYAML for a YOLO ``data.yaml``)."""

from detection.data.formats.base import Sample, Shape, Source
from detection.data.formats.labelme import read_labelme
from detection.data.formats.voc import read_voc
from detection.data.formats.yolo import read_yolo

__all__ = ["Sample", "Shape", "Source", "read_labelme", "read_voc", "read_yolo"]
