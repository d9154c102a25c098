"""Tasks: LightningModules that own a model, its loss, metrics and evaluation."""

from medlit.tasks.base import BaseTask
from medlit.tasks.classification import ClassificationTask
from medlit.tasks.detection import DetectionTask
from medlit.tasks.gan import GANTask
from medlit.tasks.segmentation import SegmentationTask
from medlit.tasks.segmentation3d import Segmentation3DTask

__all__ = [
    "BaseTask",
    "ClassificationTask",
    "DetectionTask",
    "GANTask",
    "Segmentation3DTask",
    "SegmentationTask",
]
