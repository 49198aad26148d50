"""hierax: identify species in wildlife photos with HieraDet (SAM 2's Hiera encoder), DINOv2-pretrained and
fine-tuned on iNaturalist 2021. The public API mirrors the model card.

The names below are imported on first use (PEP 562), so that `import hierax.errors` or the `hierax` command
does not load torch before it needs it."""

import importlib
from importlib.metadata import version as package_version

__version__ = package_version("hierax")

_PUBLIC = {
    "ModelInfo": "hierax.weights.files",
    "classification_transform": "hierax.transforms",
    "create_model": "hierax.models",
    "get_size_from_signature": "hierax.transforms",
    "list_models": "hierax.weights.catalog",
    "list_networks": "hierax.models",
    "load_pretrained_model": "hierax.weights.load",
    "register_weights": "hierax.weights.catalog",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hierax' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [*sorted(_PUBLIC), "__version__"]
