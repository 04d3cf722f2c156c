"""Ensemble members: the checkpoint format, and loading from files or timm names.

A member checkpoint is ONE safetensors file: the model's weights plus a JSON document under the
``"divfast"`` metadata key::

    {"format": "divfast-member", "format_version": 1, "architecture": "resnet10t",
     "model_kwargs": {}, "num_classes": 10, "input_size": [3, 32, 32],
     "mean": [...], "std": [...], "provenance": {"dataset": ..., "loss": ..., "seed": ..., ...}}

Loading never unpickles anything: safetensors holds raw tensors and the metadata is JSON.
``timm:NAME`` builds a timm model with its pretrained weights when they are available locally (the
hub cache) and fails with a one-line error when they are not (no network at run time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from divfast.errors import DivfastError
from divfast.io import atomic_path

FORMAT = "divfast-member"
FORMAT_VERSION = 1


@dataclass
class MemberInfo:
    """What a checkpoint says about its model."""

    architecture: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    name: str = ""
    class_names: list[str] | None = None  # the dataset's classes in label order, when known

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architecture": self.architecture, "model_kwargs": self.model_kwargs,
                "num_classes": self.num_classes, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "class_names": self.class_names,
                "provenance": self.provenance}

    def validate(self) -> None:
        """Raises ValueError when the fields cannot describe a working image classifier."""
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError("architecture must be a non-empty string")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        size = self.input_size
        if len(size) != 3 or any(int(v) != v or v < 1 for v in size):
            raise ValueError(f"input_size must be 3 positive integers (C, H, W), got {list(size)}")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != size[0]:
                raise ValueError(f"{key} needs {size[0]} values (one per channel), got {len(values)}")
        if any(not v > 0 for v in self.std):
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for "
                             f"{self.num_classes} classes")


class Member(nn.Module):
    """A classifier that takes images in [0, 1] ``(B, 3, H, W)``: it resizes to its input size when
    needed and applies its own normalisation, so one batch of data serves every member."""

    def __init__(self, model: nn.Module, info: MemberInfo):
        super().__init__()
        self.model = model
        self.info = info
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    @property
    def name(self) -> str:
        return self.info.name or self.info.architecture

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(self.info.input_size[1:])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.model((images - self.mean) / self.std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def create_member(architecture: str, num_classes: int, input_size=(3, 32, 32),
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), model_kwargs: dict | None = None,
                  provenance: dict | None = None, name: str = "",
                  class_names: list[str] | None = None) -> Member:
    """A freshly initialised timm model wrapped as a Member (no weights are downloaded)."""
    import timm

    kwargs = dict(model_kwargs or {})
    check_architectures([architecture])
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **kwargs)
    info = MemberInfo(architecture, int(num_classes), tuple(input_size), tuple(mean), tuple(std),
                      kwargs, dict(provenance or {}), name,
                      list(class_names) if class_names is not None else None)
    info.validate()
    return Member(model, info)


def check_architectures(architectures: list[str], option: str = "--members") -> None:
    """Every name must be a timm architecture; the error names ``option`` and the bad name."""
    import timm

    for arch in architectures:
        if not arch or not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:4]}*")[:5] if arch else []
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise DivfastError(f"{option}: unknown timm architecture {arch!r} (see "
                               f"timm.list_models() for valid names{hint})")


def save_member(member: Member, path: str) -> None:
    """Writes ``member`` as a divfast checkpoint (safetensors + JSON metadata), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in member.model.state_dict().items()}
    meta = {"divfast": json.dumps(member.info.to_json())}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def read_member_info(path: str) -> MemberInfo:
    """Reads only the metadata of a checkpoint (cheap: the header, not the weights)."""
    from safetensors import safe_open

    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise DivfastError(
            f"--members: {path!r} is not a readable safetensors checkpoint ({exc})") from exc
    if "divfast" not in meta:
        raise DivfastError(f"--members: {path!r} has no divfast metadata (expected a checkpoint "
                           "written by `divfast train` or divfast.data.save_member)")
    try:
        doc = json.loads(meta["divfast"])
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {doc['format_version']} is newer than this divfast")
        names = doc.get("class_names")
        info = MemberInfo(doc["architecture"], int(doc["num_classes"]), tuple(doc["input_size"]),
                          tuple(float(v) for v in doc["mean"]), tuple(float(v) for v in doc["std"]),
                          dict(doc.get("model_kwargs", {})), dict(doc.get("provenance", {})),
                          os.path.splitext(os.path.basename(path))[0],
                          [str(c) for c in names] if names is not None else None)
        info.validate()
        return info
    except (ValueError, KeyError, TypeError) as exc:
        raise DivfastError(f"--members: {path!r} has malformed divfast metadata ({exc})") from exc


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DivfastError(f"--members: {path!r} does not exist (expected a member checkpoint "
                           "file or timm:NAME)")
    if not os.path.isfile(path):
        raise DivfastError(f"--members: {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise DivfastError(f"--members: {path!r} is not readable")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connect within ``timeout`` seconds.

    huggingface_hub retries an unreachable hub for most of a minute; one quick probe lets an offline
    machine fail at once.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _create_pretrained(arch: str, offline: bool):
    import timm
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or saved
    try:
        return timm.create_model(arch, pretrained=True)
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load_timm(name: str) -> Member:
    """``timm:NAME``: pretrained weights from the local cache first; the hub only if it answers."""
    import timm

    arch = name[len("timm:"):]
    if not arch or not timm.is_model(arch):
        raise DivfastError(f"--members: unknown timm model {arch!r} in {name!r}")
    try:
        model = _create_pretrained(arch, offline=True)
    except Exception as cached_exc:  # not in the cache (hub errors vary by version)
        if not _hub_reachable():
            raise DivfastError(
                f"--members: pretrained weights for {name!r} are not in the local cache and the "
                "model hub is unreachable (offline?); pass a checkpoint file instead, or "
                "pre-populate the timm/Hugging Face cache") from cached_exc
        try:
            model = _create_pretrained(arch, offline=False)
        except Exception as exc:  # noqa: BLE001  (no pretrained tag, download refused, ...)
            first = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise DivfastError(
                f"--members: pretrained weights for {name!r} are not available ({first}); "
                "pass a checkpoint file instead") from exc
    cfg = model.pretrained_cfg
    info = MemberInfo(arch, int(model.num_classes), tuple(cfg.get("input_size", (3, 224, 224))),
                      tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                      tuple(cfg.get("std", (0.229, 0.224, 0.225))), {},
                      {"source": f"timm pretrained: {cfg.get('hf_hub_id') or arch}"}, arch)
    return Member(model, info)


def load_member(spec: str, device: torch.device | str = "cpu") -> Member:
    """Loads one member: a checkpoint path or ``timm:NAME``; returns it in eval mode on ``device``."""
    if spec.startswith("timm:"):
        member = _load_timm(spec)
    else:
        from safetensors.torch import load_file

        info = read_member_info(spec)
        try:
            check_architectures([info.architecture])
        except DivfastError as exc:
            raise DivfastError(f"--members: {spec!r} names an architecture this timm lacks: "
                               f"{info.architecture!r}") from exc
        try:
            member = create_member(info.architecture, info.num_classes, info.input_size, info.mean,
                                   info.std, info.model_kwargs, info.provenance, info.name,
                                   info.class_names)
        except (TypeError, ValueError, RuntimeError) as exc:  # model_kwargs timm rejects
            raise DivfastError(f"--members: {spec!r} describes a model timm cannot build "
                               f"({' '.join(str(exc).split())[:200]})") from exc
        try:
            state = load_file(spec)
            member.model.load_state_dict(state, strict=True)
        except (RuntimeError, OSError) as exc:
            first = " ".join(str(exc).split())[:300]  # torch's message spans lines: keep the keys
            raise DivfastError(f"--members: weights in {spec!r} do not fit architecture "
                               f"{info.architecture!r} ({first})") from exc
    return member.to(device).eval()


def load_members(specs: list[str], device: torch.device | str = "cpu") -> list[Member]:
    """Loads every member; all must predict the same number of classes."""
    if not specs:
        raise DivfastError("--members: expected at least one member (comma-separated paths or "
                           "timm:NAME)")
    members = [load_member(s, device) for s in specs]
    first = members[0].info.num_classes
    for spec, m in zip(specs, members):
        if m.info.num_classes != first:
            raise DivfastError(
                f"--members: {spec!r} predicts {m.info.num_classes} classes but {specs[0]!r} "
                f"predicts {first}; every member must share the class count")
    return members
