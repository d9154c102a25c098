"""medlit: a PyTorch Lightning experiment framework for medical image deep learning."""

__version__ = "0.1.0"
