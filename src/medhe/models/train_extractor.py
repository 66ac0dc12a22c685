"""Training for the split model of the Paillier path: a public extractor and a private linear head, trained jointly.

Both halves are trained end to end as one network (extractor -> head) and returned separately, because only the
split matters at inference. Model selection uses the validation split only (best validation accuracy, ties broken
by lower validation loss); the test split is never looked at here. Light augmentation (``medhe.models.augment``:
small warps, brightness/contrast) stands in for the pretraining a 567-image training set lacks.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medhe.models.augment import Augment
from medhe.models.mobilenet import build_linear_head, build_mobilenetv2_extractor
from medhe.models.train import ema_update


@dataclass
class SplitTrainResult:
    extractor: nn.Sequential
    head: nn.Sequential
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def predict_logits(extractor: nn.Module, head: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Plaintext logits (N, K) in float64, in eval mode."""
    extractor.eval()
    head.eval()
    out = [head(extractor(torch.from_numpy(x[i:i + batch]))).double().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def _val_stats(extractor, head, x, y) -> tuple[float, float]:
    logits = predict_logits(extractor, head, x)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item())
    return float((logits.argmax(1) == y).mean()), loss


def train_split_model(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                      extractor_kwargs: dict[str, Any], num_outputs: int = 2, epochs: int = 30,
                      batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
                      augment: Augment | None = None,
                      ema_decay: float | None = None, low_res: int | None = None, low_res_epochs: int = 0,
                      init: tuple[dict, dict] | None = None, init_extractor: dict | None = None,
                      multi_label: bool = False, seed: int = 0, log: Any = None,
                      select: str = "best-val") -> SplitTrainResult:
    """Train extractor + head on float32 (N, C, H, W) inputs and int labels (N,); returns the best-on-val epoch.

    With ``ema_decay`` the evaluated (and returned) weights are an exponential moving average of the trained
    ones: on a few hundred images, per-step weights swing enough to move validation accuracy by 10 points.
    ``low_res``/``low_res_epochs``: progressive resizing — the first epochs see images downscaled to ``low_res``
    (4x cheaper at half size; the network is size-agnostic thanks to the global pool), the rest full size.
    ``init``: (extractor, head) state dicts to continue from (a warm restart with a fresh learning-rate cycle).
    ``init_extractor``: start the extractor from these (pretrained) weights, the head from its seeded init.
    ``multi_label``: 0/1 targets (N, L), binary cross-entropy per label, for pretraining on a multi-label set;
    there is no validation accuracy, so it needs ``select="last"`` and ignores the validation arrays.
    ``select="last"`` returns the last epoch instead of the best on validation — for a final fit whose training
    set includes the validation images (the epoch count must then be fixed beforehand).
    """
    if select not in ("best-val", "last"):
        raise ValueError(f"select must be 'best-val' or 'last', not {select!r}")
    if multi_label and select != "last":
        raise ValueError("multi-label training has no validation accuracy to select on: use select='last'")
    if init is not None and init_extractor is not None:
        raise ValueError("give either init (extractor and head) or init_extractor, not both")
    torch.manual_seed(seed)
    augment = Augment() if augment is None else augment
    gen = torch.Generator().manual_seed(seed)
    extractor = build_mobilenetv2_extractor(**extractor_kwargs)
    head = build_linear_head(extractor_kwargs.get("feature_dim", 32), num_outputs)
    if init is not None:
        extractor.load_state_dict(init[0])
        head.load_state_dict(init[1])
    if init_extractor is not None:
        extractor.load_state_dict(init_extractor)
    net = nn.Sequential(extractor, head)
    params = list(net.parameters())
    shadow = copy.deepcopy(net) if ema_decay else net
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    tx = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    if multi_label:
        ty = torch.from_numpy(np.asarray(train_y, dtype=np.float32).reshape(len(tx), -1))
        loss_fn = F.binary_cross_entropy_with_logits
    else:
        ty = torch.from_numpy(np.asarray(train_y, dtype=np.int64).reshape(-1))
        vy = np.asarray(val_y, dtype=np.int64).reshape(-1)
        loss_fn = F.cross_entropy
    best: tuple[float, float] = (-1.0, math.inf)
    best_state = None
    result = SplitTrainResult(extractor, head, -1)
    start = time.perf_counter()
    for epoch in range(epochs):
        extractor.train()
        head.train()
        order = torch.randperm(len(tx), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            batch = augment(tx[idx], gen)
            if low_res and epoch < low_res_epochs:
                batch = F.interpolate(batch, size=(low_res, low_res), mode="bilinear", antialias=True,
                                      align_corners=False)
            loss = loss_fn(head(extractor(batch)), ty[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema_decay:
                ema_update(shadow, net, ema_decay)
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch + 1, "train_loss": total / len(tx)}
        if multi_label:
            val_acc, val_loss = math.nan, math.nan
        else:
            val_acc, val_loss = _val_stats(shadow[0], shadow[1], val_x, vy)
            row.update(val_acc=val_acc, val_loss=val_loss)
        result.history.append(row)
        if log:
            shown = "" if multi_label else f" val_acc {val_acc:.4f} val_loss {val_loss:.4f}"
            log(f"epoch {epoch + 1}/{epochs} train_loss {row['train_loss']:.4f}{shown} "
                f"({time.perf_counter() - start:.0f}s)")
        if select == "last" or (val_acc, -val_loss) > (best[0], -best[1]):
            best = (val_acc, val_loss)
            best_state = (copy.deepcopy(shadow[0].state_dict()), copy.deepcopy(shadow[1].state_dict()))
            result.best_epoch = epoch + 1
    if best_state is not None:
        extractor.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    extractor.eval()
    head.eval()
    result.seconds = time.perf_counter() - start
    return result
