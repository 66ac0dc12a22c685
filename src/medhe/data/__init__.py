"""Datasets (MedMNIST 2D and labelled image folders), image reading and the model's preprocessing."""

from .dataset import TASKS, Dataset
from .images import read_image
from .loader import dataset_info, load_dataset
from .medmnist import FLAGS as MEDMNIST_FLAGS
from .medmnist import resolve_data_dir
from .preprocess import Preprocess

__all__ = [
    "Dataset",
    "MEDMNIST_FLAGS",
    "Preprocess",
    "TASKS",
    "dataset_info",
    "load_dataset",
    "read_image",
    "resolve_data_dir",
]
