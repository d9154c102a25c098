"""DataModules shared by every task that fits their data."""

from medlit.datamodules.base import BaseDataModule
from medlit.datamodules.brats import BraTSDataModule

__all__ = ["BaseDataModule", "BraTSDataModule"]
