"""DataModules shared by every task that fits their data, and their settings groups."""

from medlit.datamodules.base import BaseDataModule, Loader
from medlit.datamodules.brats import BraTSDataModule
from medlit.datamodules.isic import ISICDataModule
from medlit.datamodules.luna16 import LUNA16DataModule, Subsets
from medlit.datamodules.splits import Split
from medlit.datamodules.volumes import VolumeDataModule

__all__ = [
    "BaseDataModule",
    "BraTSDataModule",
    "ISICDataModule",
    "LUNA16DataModule",
    "Loader",
    "Split",
    "Subsets",
    "VolumeDataModule",
]
