"""hierax: identify species in wildlife photos with HieraDet (SAM 2's Hiera encoder), DINOv2-pretrained and
fine-tuned on iNaturalist 2021. The public API mirrors the model card."""

from importlib.metadata import version as package_version

from hierax.models import create_model, list_networks
from hierax.transforms import classification_transform, get_size_from_signature
from hierax.weights.catalog import list_weights, register_weights
from hierax.weights.files import ModelInfo
from hierax.weights.load import load_pretrained_model

__version__ = package_version("hierax")


def list_models(include_networks: bool = False) -> list[str]:
    """Names `load_pretrained_model` accepts (registered weights and their aliases); with include_networks,
    the architecture names `create_model` accepts too."""
    names = [alias for entry in list_weights() for alias in (entry.name, *entry.aliases)]
    return names + list_networks() if include_networks else names


__all__ = [
    "ModelInfo",
    "classification_transform",
    "create_model",
    "get_size_from_signature",
    "list_models",
    "list_networks",
    "load_pretrained_model",
    "register_weights",
    "__version__",
]
