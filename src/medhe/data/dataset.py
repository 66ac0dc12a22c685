"""The in-memory dataset every loader returns, so training and evaluation never care where images came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TASKS = ("binary-class", "multi-class", "multi-label", "ordinal-regression")
SPLITS = ("train", "val", "test", "all")


@dataclass(repr=False)
class Dataset:
    """Images and labels of one split.

    ``images``: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB. ``labels``: int64 (N, 1) class index, or (N, L) 0/1
    for multi-label. ``groups`` (e.g. patient ids) and ``paths`` (relative to the folder) exist for folder datasets.
    """

    name: str
    split: str
    task: str
    label_names: list[str]
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    paths: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[-1])

    @property
    def num_outputs(self) -> int:
        """Logits a model needs: one per class (binary included) or one per label."""
        return len(self.label_names)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, task={self.task!r}, n={len(self)}, "
            f"images={tuple(self.images.shape)}, labels={tuple(self.labels.shape)}, "
            f"label_names={self.label_names!r})"
        )
