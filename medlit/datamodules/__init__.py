"""DataModules shared by every task that fits their data."""

from medlit.datamodules.base import BaseDataModule
from medlit.datamodules.brats import BraTSDataModule
from medlit.datamodules.isic import ISICDataModule
from medlit.datamodules.luna16 import LUNA16DataModule

__all__ = ["BaseDataModule", "BraTSDataModule", "ISICDataModule", "LUNA16DataModule"]
