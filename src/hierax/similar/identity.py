"""Which model made a set of embeddings: an index or a few-shot file records it, and refuses embeddings of another.

Embeddings of two models (or of one model at two input sizes, or with and without test-time augmentation) do
not live in one space, so comparing them gives confident nonsense. `ModelIdentity` holds what a reader needs to
tell: the name or path, network, class count, embedding size, input size, tta, and a sha256 fingerprint of the
weights (over the state dict's names, dtypes, shapes and bytes, so a .pt and a .safetensors of the same weights
agree; about 0.1 s for hieradet_d_small).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hierax.errors import HieraxError
from hierax.weights.files import ModelInfo, read_checkpoint
from hierax.weights.formats import is_exported
from hierax.weights.load import resolve_file

IN_MEMORY = "(in memory)"


class ModelMismatchError(HieraxError):
    """Embeddings of one model met a file (index, few-shot species) made by another."""


def _state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "file:" + digest.hexdigest()


def weights_fingerprint(model, net) -> str:
    """sha256 of the weights `net` runs: its state dict, or (an exported runner) the checkpoint it came from,
    or the exported file itself."""
    state = net.state_dict() if isinstance(net, torch.nn.Module) else {}
    if state:
        return _state_fingerprint(state)
    if isinstance(model, str | os.PathLike):
        path, _ = resolve_file(model, progress=False)
        if is_exported(path):
            return _file_fingerprint(path)
        return _state_fingerprint(read_checkpoint(path)[0])
    raise HieraxError("cannot fingerprint this model's weights: pass a name, a checkpoint path or a torch module")


def model_label(model) -> str:
    """How a model spec is recorded: a registry name as given, a file as its absolute path."""
    if isinstance(model, tuple):
        return IN_MEMORY
    text = os.fspath(model)
    return str(Path(text).resolve()) if Path(text).is_file() else text


@dataclass(frozen=True)
class ModelIdentity:
    """What made a set of embeddings (see the module docstring)."""

    model: str
    network: str
    num_classes: int
    embedding_dim: int
    size: tuple[int, int]
    tta: bool
    fingerprint: str

    @classmethod
    def of(cls, model, net, info: ModelInfo, *, tta: bool = False) -> ModelIdentity:
        """The identity of a resolved (net, info), loaded from `model` (the spec it came from)."""
        dim = getattr(net, "embedding_size", None)
        if dim is None:
            dim = int(np.asarray(net.embedding(torch.zeros(1, 3, *info.size))).shape[-1])
        return cls(
            model=model_label(model),
            network=info.network,
            num_classes=info.num_classes,
            embedding_dim=int(dim),
            size=tuple(int(v) for v in info.size),
            tta=bool(tta),
            fingerprint=weights_fingerprint(model, net),
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["size"] = list(self.size)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelIdentity:
        try:
            return cls(
                model=str(data["model"]),
                network=str(data["network"]),
                num_classes=int(data["num_classes"]),
                embedding_dim=int(data["embedding_dim"]),
                size=(int(data["size"][0]), int(data["size"][1])),
                tta=bool(data["tta"]),
                fingerprint=str(data["fingerprint"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise HieraxError(f"the model record is incomplete or damaged ({err!r})") from None

    def describe(self) -> str:
        """One line for messages: model, network, classes, embedding size, input size, tta, fingerprint."""
        h, w = self.size
        return (
            f"{self.model} ({self.network}, {self.num_classes} classes, {self.embedding_dim}-d, {h}x{w}"
            f"{', tta' if self.tta else ''}, weights {self.fingerprint[:12]})"
        )

    def check(self, other: ModelIdentity, what: str) -> None:
        """Raise ModelMismatchError unless `other` (the model at hand) makes the same embeddings as self (the
        model `what` was made with). The name may differ (a moved or renamed file); the weights may not."""
        if self.fingerprint != other.fingerprint or self.embedding_dim != other.embedding_dim:
            raise ModelMismatchError(
                f"{what} was made by another model: {self.describe()}; this is {other.describe()}. "
                f"Use the model it was made with (--model {self.model}), or build a new one with this model."
            )
        if self.size != other.size or self.tta != other.tta:
            h, w = self.size
            raise ModelMismatchError(
                f"{what} was made at input size {h}x{w}{' with --tta' if self.tta else ' without --tta'}; "
                f"embed at the same settings (--size {h} {w}{' --tta' if self.tta else ''})"
            )
