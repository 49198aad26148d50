"""Response bodies of the service, as pydantic models so the OpenAPI schema documents them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Lineage(BaseModel):
    """The ranks of an iNat21 class name; ranks a name does not have are null."""

    kingdom: str | None = None
    phylum: str | None = None
    class_: str | None = Field(None, alias="class")
    order: str | None = None
    family: str | None = None
    genus: str | None = None
    species: str | None = None

    model_config = {"populate_by_name": True}


class Prediction(BaseModel):
    """One of the top-k classes."""

    index: int
    label: str = Field(description="the class name as the model stores it")
    probability: float
    scientific_name: str
    common_name: str | None = None
    taxonomy: Lineage


class Verdict(BaseModel):
    """The roll-up: the deepest rank whose summed probability reaches its threshold (rank null when none does)."""

    rank: str | None
    name: str | None
    probability: float
    common_name: str | None = None
    uncertain: bool = Field(description="true when the species itself is below its threshold")
    thresholds: dict[str, float]


class ImageSize(BaseModel):
    width: int
    height: int


class ClassifyResponse(BaseModel):
    model: str
    image: ImageSize
    predictions: list[Prediction]
    verdict: Verdict | None = None


class EmbedResponse(BaseModel):
    model: str
    image: ImageSize
    embedding_size: int
    embedding: list[float]


class ModelCard(BaseModel):
    name: str
    network: str
    task: str
    num_classes: int
    size: tuple[int, int] = Field(description="input (height, width)")
    rgb_stats: dict[str, list[float]]
    embedding_size: int | None
    version: str
    max_batch: int


class ModelsResponse(BaseModel):
    models: list[ModelCard]
    max_upload_bytes: int


class Health(BaseModel):
    status: str
    models: list[str]
    batches: int
    images: int
    mean_batch: float


class ErrorBody(BaseModel):
    """Every error answer: a short machine-readable code and a message for people."""

    error: str
    detail: str
