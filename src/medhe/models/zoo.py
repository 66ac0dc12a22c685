"""The model zoo: every architecture medhe can rebuild from a model card, by name.

Architectures defined in their own modules are listed lazily (``module:function``) so that importing the zoo
stays cheap and modules stay one idea each.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from torch import nn

from medhe.errors import ArtifactError

#: arch name -> builder, or "module:function" resolved on first use.
ARCHS: dict[str, Callable[..., nn.Module] | str] = {
    "fcnn": "medhe.models.architectures:build_fcnn",
    "hecnn": "medhe.models.architectures:build_hecnn",
    "lenet5-he": "medhe.models.architectures:build_lenet5_he",
    "p3cnn": "medhe.models.architectures:build_p3cnn",
    "hefnet-se": "medhe.models.architectures:build_hefnet_se",
    "tenseal-tutorial4": "medhe.models.architectures:build_tenseal_tutorial4",
    "qfcnn": "medhe.models.quant:build_qfcnn",
    "mobilenetv2-he": "medhe.models.mobilenet:build_mobilenetv2_extractor",
    "linear-head": "medhe.models.mobilenet:build_linear_head",
    "vq-encoder": "medhe.models.autoencoder:build_encoder",
    "latent-hecnn": "medhe.models.autoencoder:build_latent_classifier",
}


def register_arch(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make a user-defined architecture loadable from cards (bring-your-own models)."""
    ARCHS[name] = builder


def get_builder(arch: str) -> Callable[..., nn.Module]:
    try:
        entry = ARCHS[arch]
    except KeyError:
        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ArtifactError(f"unknown architecture {arch!r}{hint}: known are {', '.join(sorted(ARCHS))}") from None
    if isinstance(entry, str):
        module, _, fn = entry.partition(":")
        entry = getattr(importlib.import_module(module), fn)
        ARCHS[arch] = entry
    return entry


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build ``arch`` with the keyword arguments recorded in a card's ``arch_kwargs``."""
    builder = get_builder(arch)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"architecture {arch!r} rejected its arguments {kwargs}: {exc}") from None
