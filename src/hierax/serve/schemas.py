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
    extra: bool = Field(
        False, description="one of the user's own species (--extra-species); its index counts on from the model's"
    )


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


class GeoContext(BaseModel):
    """Where and when the photo was taken as the location prior used it (--geo-prior)."""

    applied: bool = Field(description="true when the prior re-weighted the predictions (it needs a location)")
    latitude: float | None = None
    longitude: float | None = None
    date: str | None = Field(None, description="YYYY-MM-DD")
    location_source: str | None = Field(None, description="'request' (lat, lon) or 'exif' (the photo's GPS)")
    date_source: str | None = Field(None, description="'request' (date) or 'exif' (DateTimeOriginal)")
    warnings: list[str] = Field(default_factory=list, description="unusable values that were skipped")


class Decision(BaseModel):
    """The open-set answer (with an unknown threshold): the best name, or "unknown" when it is too unlikely."""

    name: str
    probability: float
    unknown: bool
    threshold: float


class ClassifyResponse(BaseModel):
    model: str
    image: ImageSize
    predictions: list[Prediction]
    verdict: Verdict | None = None
    geo: GeoContext | None = Field(None, description="present when the service runs a location prior")
    decision: Decision | None = Field(None, description="present when an unknown threshold is in force")


class SimilarMatch(BaseModel):
    """One indexed photo like the upload."""

    rank: int
    id: int = Field(description="the photo's position in the index")
    path: str
    similarity: float = Field(description="cosine similarity of the embeddings, in [-1, 1]")
    thumbnail: str | None = Field(None, description="URL of a small copy (when the service serves thumbnails)")


class SimilarResponse(BaseModel):
    model: str
    image: ImageSize
    index_size: int
    matches: list[SimilarMatch]


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


class Features(BaseModel):
    """What this service adds to the model's own answer."""

    geo_prior: bool = False
    similar_index: int | None = Field(None, description="photos in the similar-photo index (null: no index)")
    thumbnails: bool = False
    extra_species: list[str] = Field(default_factory=list, description="the user's own species")
    only_extra: bool = False
    unknown_threshold: float | None = None


class ModelsResponse(BaseModel):
    models: list[ModelCard]
    max_upload_bytes: int
    features: Features = Field(default_factory=Features)


class Health(BaseModel):
    status: str
    models: list[str]
    batches: int
    images: int
    mean_batch: float
    queue_depth: int = Field(0, description="model requests inside the service now")


class ErrorBody(BaseModel):
    """Every error answer: a short machine-readable code and a message for people."""

    error: str
    detail: str
