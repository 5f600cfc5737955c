"""ImageFolder data: check the tree, decode every common image to RGB, build seeded loaders."""

from imgcls.data.check import DataReport
from imgcls.data.folder import ImageFolderData, find_classes, scan_class
from imgcls.data.images import BadImageError, load_image
from imgcls.data.loading import DataError, ImageDataset, Normalize
from imgcls.data.splits import fingerprint_changes

__all__ = [
    "BadImageError",
    "DataError",
    "DataReport",
    "ImageDataset",
    "ImageFolderData",
    "Normalize",
    "find_classes",
    "fingerprint_changes",
    "load_image",
    "scan_class",
]
