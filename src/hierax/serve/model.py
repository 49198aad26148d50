"""One model as the service runs it: preprocessing, a micro-batcher around infer_batch, the location prior, the
user's species, the unknown rule, the similar-photo index and its labels.

Order of an answer: the model's probabilities -> the location prior (per batch, rows with a location only) ->
the user's species share the list (hierax.similar.openset.combine_scores) -> top-k, the roll-up and the open-set
decision on that one list, so the ranked predictions, the verdict and the decision always agree.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hierax.data.images import MAX_PIXELS, decode_image
from hierax.data.metadata import CaptureContext, capture_context
from hierax.data.taxonomy import DEFAULT_THRESHOLDS, Rollup, Taxonomy, top_k
from hierax.errors import HieraxError
from hierax.geo import apply_prior
from hierax.inference.classification import infer_batch
from hierax.serve.batcher import MicroBatcher
from hierax.serve.options import Addons
from hierax.serve.schemas import (
    Decision,
    Features,
    GeoContext,
    ImageSize,
    ModelCard,
    Prediction,
    SimilarMatch,
    Verdict,
)
from hierax.similar import UNKNOWN, ModelIdentity, RankedScores, combine_scores, open_set_rollup, unknown_mask
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo

THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 256
_SOURCES = {"csv": "request", "exif": "exif", "override": "request"}  # capture_context's names, as the API says


@dataclass
class Job:
    """One image for the batcher: its model input and where and when it was taken (None without a prior)."""

    x: torch.Tensor
    place: CaptureContext | None = None


@dataclass
class Output:
    """The batcher's answer for one image: the model's probabilities after the prior, and its embedding."""

    probs: np.ndarray
    embedding: np.ndarray | None
    prior_applied: bool = False


def geo_context(place: CaptureContext, applied: bool) -> GeoContext:
    """The answer's account of the place and date the prior saw."""
    return GeoContext(
        applied=applied,
        latitude=place.latitude,
        longitude=place.longitude,
        date=place.date.isoformat() if place.date else None,
        location_source=_SOURCES.get(place.location_source),
        date_source=_SOURCES.get(place.date_source),
        warnings=list(place.warnings),
    )


class ServedModel:
    """See the module docstring. `model_spec` (the name or path the model was loaded from) names the model in the
    message when an index or species file was made by another one (ModelMismatchError, at start-up)."""

    def __init__(
        self,
        name: str,
        net: torch.nn.Module,
        info: ModelInfo,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        common_names: Mapping[int, str] | None = None,
        thresholds: Mapping[str, float] | None = None,
        max_pixels: int = MAX_PIXELS,
        addons: Addons | None = None,
        model_spec=None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.name = name
        self.net = net
        self.info = info
        self.max_pixels = max_pixels
        self.addons = addons or Addons()
        self.transform = classification_transform(info.size, info.rgb_stats)
        self.has_embedding = all(hasattr(net, attr) for attr in ("embedding", "classify"))
        self.embedding_size = getattr(net, "embedding_size", None) if self.has_embedding else None
        self.taxonomy = Taxonomy(info.class_names, common_names)
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        if self.taxonomy.is_taxonomic:  # build the per-rank group tables now rather than on the first request
            self.taxonomy.rollup(np.full(info.num_classes, 1.0 / info.num_classes), self.thresholds)
        self._check_addons(model_spec)
        index = self.addons.index
        self._ids = {} if index is None else {path: i for i, path in enumerate(index.paths)}
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.batcher: MicroBatcher[Job, Output] = MicroBatcher(
            self._forward, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name, on_batch=on_batch
        )

    def _check_addons(self, model_spec) -> None:
        addons = self.addons
        if addons.needs_embeddings and not self.has_embedding:
            raise HieraxError(f"model '{self.name}' gives no embeddings: --index and --extra-species need them")
        if addons.geo_prior is not None and addons.geo_prior.num_classes != self.info.num_classes:
            raise HieraxError(
                f"the geo prior has {addons.geo_prior.num_classes} classes, the model {self.info.num_classes}"
            )
        if not addons.needs_embeddings:
            return
        identity = ModelIdentity.of(
            model_spec if model_spec is not None else (self.net, self.info), self.net, self.info
        )
        if addons.index is not None:
            addons.index.check_model(identity)
        if addons.extra_species is not None:
            addons.extra_species.check_model(identity)

    @property
    def threshold(self) -> float | None:
        return self.addons.threshold

    def _forward(self, jobs: list[Job]) -> list[Output]:
        probs, emb = infer_batch(self.net, torch.stack([job.x for job in jobs]), return_embedding=self.has_embedding)
        applied = np.zeros(len(jobs), bool)
        if self.addons.geo_prior is not None:
            places = [job.place or CaptureContext() for job in jobs]
            probs, applied = apply_prior(
                self.addons.geo_prior,
                probs,
                [p.latitude for p in places],
                [p.longitude for p in places],
                [p.date for p in places],
            )
        return [Output(probs[i], None if emb is None else emb[i], bool(applied[i])) for i in range(len(jobs))]

    def preprocess(self, data: bytes, row: Mapping[str, str] | None = None) -> tuple[Job, ImageSize]:
        """Encoded bytes (and the request's lat/lon/date) -> the batcher's job and the decoded image size (runs
        in a worker thread). With a prior, the place comes from the request, else from the upload's EXIF."""
        image = decode_image(data, max_pixels=self.max_pixels)
        place = capture_context(data, row=row) if self.addons.geo_prior is not None else None
        return Job(self.transform(image), place), ImageSize(width=image.shape[2], height=image.shape[1])

    def warmup(self) -> None:
        """Run one forward pass so the first request does not pay for lazy initialisation."""
        h, w = self.info.size
        self._forward([Job(torch.zeros(3, h, w))])

    # ---- answers

    def ranked(self, out: Output) -> RankedScores | None:
        """The model's classes and the user's species as one list (None without extra species)."""
        extra = self.addons.extra_species
        if extra is None:
            return None
        model_probs = None if self.addons.only_extra else out.probs[None]
        return combine_scores(
            model_probs, out.embedding[None], extra, self.info.class_names, only_extra=self.addons.only_extra
        )

    def _prediction(self, index: int, p: float, ranked: RankedScores | None) -> Prediction:
        if ranked is not None and ranked.is_extra[index]:
            name = ranked.names[index]
            return Prediction(index=index, label=name, probability=p, scientific_name=name, taxonomy={}, extra=True)
        taxon = self.taxonomy.taxon(index)
        label = self.taxonomy.class_names[index]
        return Prediction(
            index=index,
            label=label,
            probability=p,
            scientific_name=taxon.species if taxon else label,
            common_name=self.taxonomy.common_name(index) or None,
            taxonomy=taxon.as_dict() if taxon else {},
        )

    def _verdict(self, probs: np.ndarray, ranked: RankedScores | None) -> Verdict | None:
        if not self.taxonomy.is_taxonomic or self.addons.only_extra:
            return None
        if ranked is None and self.threshold is None:
            rollup: Rollup = self.taxonomy.rollup(probs, self.thresholds)[0]
        else:
            rollup = open_set_rollup(self.taxonomy, ranked or probs, self.thresholds, self.threshold)[0]
        return Verdict(
            rank=rollup.rank or None,
            name=rollup.name or None,
            probability=rollup.probability,
            common_name=rollup.common_name or None,
            uncertain=rollup.rank != "species",
            thresholds=self.thresholds,
        )

    def _decision(self, probs: np.ndarray, ranked: RankedScores | None) -> Decision | None:
        if self.threshold is None:
            return None
        best = int(probs[0].argmax())
        p = float(probs[0, best])
        unknown = bool(unknown_mask(np.array([p]), self.threshold)[0])
        name = UNKNOWN if unknown else self._prediction(best, p, ranked).scientific_name
        return Decision(name=name, probability=p, unknown=unknown, threshold=self.threshold)

    def describe(self, out: Output, k: int) -> tuple[list[Prediction], Verdict | None, Decision | None]:
        """The top-k predictions with names and taxonomy, the roll-up verdict for iNat21-named classes, and the
        open-set decision when an unknown threshold is in force."""
        ranked = self.ranked(out)
        probs = out.probs[None] if ranked is None else ranked.probs
        indices, values = top_k(probs, k)
        predictions = [
            self._prediction(i, p, ranked) for i, p in zip(indices[0].tolist(), values[0].tolist(), strict=True)
        ]
        return predictions, self._verdict(out.probs[None], ranked), self._decision(probs, ranked)

    # ---- similar photos

    def similar(self, embedding: np.ndarray, k: int) -> list[SimilarMatch]:
        """The k indexed photos most like this embedding, best first."""
        matches = self.addons.index.search(embedding[None], k)[0]
        return [
            SimilarMatch(
                rank=rank,
                id=self._ids[m.path],
                path=m.path,
                similarity=m.similarity,
                thumbnail=f"/v1/thumbnails/{self._ids[m.path]}" if self.addons.thumbnails else None,
            )
            for rank, m in enumerate(matches, start=1)
        ]

    def thumbnail(self, photo_id: int) -> bytes:
        """A JPEG of at most THUMBNAIL_SIDE pixels of indexed photo `photo_id`: decoded and encoded afresh, so no
        byte of the file and none of its metadata (GPS) is passed on. ImageDecodeError when it is unreadable."""
        with self._thumbs_lock:
            if photo_id in self._thumbs:
                self._thumbs.move_to_end(photo_id)
                return self._thumbs[photo_id]
        pixels = decode_image(self.addons.index.paths[photo_id], max_pixels=self.max_pixels)
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        data = buffer.getvalue()
        with self._thumbs_lock:
            self._thumbs[photo_id] = data
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return data

    # ---- descriptions

    def card(self) -> ModelCard:
        """What GET /v1/models says about this model."""
        return ModelCard(
            name=self.name,
            network=self.info.network,
            task=self.info.task,
            num_classes=self.info.num_classes,
            size=self.info.size,
            rgb_stats=self.info.rgb_stats,
            embedding_size=self.embedding_size,
            version=self.info.version,
            max_batch=self.batcher.max_batch,
        )

    def features(self) -> Features:
        """What GET /v1/models says this service adds."""
        addons = self.addons
        return Features(
            geo_prior=addons.geo_prior is not None,
            similar_index=None if addons.index is None else len(addons.index),
            thumbnails=addons.thumbnails,
            extra_species=[] if addons.extra_species is None else list(addons.extra_species.class_names),
            only_extra=addons.only_extra,
            unknown_threshold=self.threshold,
        )
