"""imgcls: train and evaluate image classifiers with PyTorch, configured and swept with Hydra."""

__version__ = "0.1.0"
