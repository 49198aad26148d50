"""Evaluate a model on a labelled dataset: top-1/top-5, per class, per taxonomic rank, most-confused pairs,
calibration (reliability diagram and expected calibration error), a JSON report, PNG figures and a one-screen
text summary.

Only the top-5 classes and the top-1 confidence of each image are kept, so memory stays O(images), not
O(images x classes). Rank accuracy compares the top-1 class's lineage with the true class's: the right genus
with the wrong species counts as correct at genus level and above.

With a location prior (`geo_prior`), the same forward pass is also scored after re-weighting by each image's
place and date (an iNat21 JSON's latitude/longitude/date, else the file's EXIF; `location`/`date` override
both), and `report["geo_prior"]` puts top-1/top-5 with and without the prior side by side, over all images and
over those with a location. The rest of the report describes the image-only predictions.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hierax.atomic import atomic_write
from hierax.data.datasets import LabelledData, load_labelled
from hierax.data.metadata import Overrides
from hierax.data.taxonomy import RANKS, Taxonomy, load_common_names, top_k
from hierax.errors import HieraxError
from hierax.geo import GeoPrior
from hierax.geo.annotations import annotation_rows
from hierax.inference.loading import BatchResult, ModelSpec, iter_predictions, make_loader, resolve_model
from hierax.inference.metrics import topk_correct
from hierax.inference.place import GeoStep, PlaceTally, capture_of, load_geo_prior, prior_for_model
from hierax.sizes import check_size
from hierax.transforms import classification_transform
from hierax.weights.catalog import DEFAULT_MODEL
from hierax.weights.files import require_classifier

logger = logging.getLogger(__name__)


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins, and the per-bin table."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        conf = float(confidence[sel].mean()) if n else 0.0
        acc = float(correct[sel].mean()) if n else 0.0
        ece += n / max(1, len(confidence)) * abs(acc - conf)
        low, high = float(edges[b]), float(edges[b + 1])
        table.append({"low": low, "high": high, "count": n, "confidence": conf, "accuracy": acc})
    return ece, table


def most_confused(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], n: int = 10) -> list[dict]:
    """The n most frequent (true, predicted) pairs with true != predicted, with the share of the true class."""
    per_class = Counter(labels.tolist())
    pairs = Counter((int(t), int(p)) for t, p in zip(labels, preds, strict=True) if t != p)
    return [
        {"true": class_names[t], "predicted": class_names[p], "count": c, "fraction_of_true": c / per_class[t]}
        for (t, p), c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    ]


def short_name(name: str) -> str:
    """A readable label for plots: the binomial of an iNat21 name, else the name."""
    parts = name.split("_")
    return f"{parts[-2]} {parts[-1]}" if len(parts) == 8 and parts[0].isdigit() else name


def plot_confusion(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], path: Path, max_classes: int = 20
) -> list[str]:
    """Row-normalised confusion matrix PNG of the `max_classes` most frequent true classes; returns them."""
    counts = Counter(labels.tolist())
    chosen = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_classes]]
    pos = {c: i for i, c in enumerate(chosen)}
    matrix = np.zeros((len(chosen), len(chosen)), dtype=np.float64)
    for t, p in zip(labels.tolist(), preds.tolist(), strict=True):
        if t in pos and p in pos:
            matrix[pos[t], pos[p]] += 1
    matrix /= np.maximum(1, np.array([counts[c] for c in chosen], dtype=np.float64))[:, None]
    side = 3 + 0.35 * len(chosen)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = [short_name(class_names[c]) for c in chosen]
    ax.set_xticks(range(len(chosen)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(chosen)), ticks, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (top {len(chosen)} classes, row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    return [class_names[c] for c in chosen]


def plot_reliability(table: list[dict], ece: float, path: Path) -> None:
    """Reliability diagram PNG: accuracy per confidence bin against the diagonal, with the ECE in the title."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    centers = [(b["low"] + b["high"]) / 2 for b in table]
    width = table[0]["high"] - table[0]["low"] if table else 0.1
    ax.bar(centers, [b["accuracy"] for b in table], width=width, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram, ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def compute_metrics(
    labels: np.ndarray, top5: np.ndarray, confidence: np.ndarray, class_names: Sequence[str], *, bins: int = 15
) -> dict:
    """All figures of the report from true labels, top-5 predictions (N, k) and top-1 confidences."""
    preds = top5[:, 0]
    correct1, correct5 = topk_correct(top5, labels)
    counts = np.bincount(labels, minlength=len(class_names))
    hits1 = np.bincount(labels, weights=correct1, minlength=len(class_names))
    hits5 = np.bincount(labels, weights=correct5, minlength=len(class_names))
    per_class = [
        {"class": class_names[c], "count": int(counts[c]), "top1": hits1[c] / counts[c], "top5": hits5[c] / counts[c]}
        for c in np.flatnonzero(counts)
    ]
    ece, table = calibration(confidence, correct1, bins)
    report = {
        "evaluated": int(len(labels)),
        "top1": float(correct1.mean()) if len(labels) else 0.0,
        "top5": float(correct5.mean()) if len(labels) else 0.0,
        "mean_per_class_top1": float(np.mean([c["top1"] for c in per_class])) if per_class else 0.0,
        "per_rank": {},
        "per_class": per_class,
        "most_confused": most_confused(labels, preds, class_names),
        "ece": float(ece),
        "reliability": table,
    }
    taxonomy = Taxonomy(class_names)
    if taxonomy.is_taxonomic and len(labels):
        for rank in RANKS:
            group = taxonomy.group_of(rank)
            report["per_rank"][rank] = float((group[preds] == group[labels]).mean())
    return report


def format_summary(report: dict) -> str:
    """A one-screen text summary of a report."""
    lines = [
        f"model {report.get('model', '?')} on {report.get('dataset', '?')}",
        f"images: {report['evaluated']} evaluated, {report.get('failed', 0)} failed to decode",
        f"top-1 {report['top1']:.2%}   top-5 {report['top5']:.2%}   mean per-class top-1 "
        f"{report['mean_per_class_top1']:.2%}   ECE {report['ece']:.4f}",
    ]
    if report["per_rank"]:
        lines.append("per rank: " + "  ".join(f"{r} {a:.2%}" for r, a in reversed(report["per_rank"].items())))
    worst = sorted(report["per_class"], key=lambda c: (c["top1"], -c["count"]))[:5]
    if worst:
        lines.append("weakest classes:")
        lines += [f"  {c['top1']:6.1%}  (n={c['count']})  {short_name(c['class'])}" for c in worst]
    if report["most_confused"]:
        lines.append("most confused (true -> predicted):")
        lines += [
            f"  {p['count']:5d}  {short_name(p['true'])} -> {short_name(p['predicted'])}"
            for p in report["most_confused"][:5]
        ]
    lines += _geo_lines(report.get("geo_prior"))
    for kind, path in report.get("files", {}).items():
        lines.append(f"{kind}: {path}")
    return "\n".join(lines)


def _geo_lines(geo: dict | None) -> list[str]:
    """The side-by-side table of report["geo_prior"]."""
    if not geo:
        return []
    head = f"geo prior {geo['prior']}: {geo['images_with_location']} of {geo['evaluated']} images with a location"
    if geo["broken_metadata"]:
        head += f", {geo['broken_metadata']} with broken location or date metadata (ignored)"
    lines = [head, f"{'':26}{'image only':>10}{'with prior':>12}"]
    for subset, label in (("all_images", "all images"), ("with_location", "with a location")):
        for k, shown in (("top1", "top-1"), ("top5", "top-5")):
            pair = geo[subset]
            lines.append(f"  {shown}, {label:<17}{pair['image_only'][k]:>10.2%}{pair['with_prior'][k]:>12.2%}")
    return lines


class _PriorScores:
    """The prior's side of an evaluation: each batch re-weighted by GeoStep, its top-5 kept beside the
    image-only one, and which images had a location."""

    def __init__(self, prior: GeoPrior, label: str) -> None:
        self.step, self.label, self.tally = GeoStep(prior), label, PlaceTally()
        self.top5: list[np.ndarray] = []
        self.located: list[np.ndarray] = []

    def add(self, result: BatchResult) -> None:
        self.tally.add(result)
        self.top5.append(top_k(self.step(result.probs, result), 5)[0])
        self.located.append(np.array([capture_of(m).has_location for m in result.meta], dtype=bool))

    def report(self, labels: np.ndarray, image_top5: np.ndarray) -> dict:
        """Top-1/top-5 with and without the prior, over all images and over those with a location."""
        k = image_top5.shape[1]
        prior_top5 = np.concatenate(self.top5) if self.top5 else np.zeros((0, k), dtype=np.int64)
        located = np.concatenate(self.located) if self.located else np.zeros(0, dtype=bool)

        def rates(top5: np.ndarray, rows: np.ndarray) -> dict:
            hits1, hits5 = topk_correct(top5[rows], labels[rows])
            return {
                "top1": float(hits1.mean()) if rows.any() else 0.0,
                "top5": float(hits5.mean()) if rows.any() else 0.0,
            }

        out = {"prior": self.label, "evaluated": int(len(labels)), "images_with_location": int(located.sum())}
        out["broken_metadata"] = self.tally.warned
        for subset, rows in (("all_images", np.ones(len(labels), bool)), ("with_location", located)):
            out[subset] = {"image_only": rates(image_top5, rows), "with_prior": rates(prior_top5, rows)}
        return out


def map_labels(data: LabelledData, taxonomy: Taxonomy) -> np.ndarray:
    """The dataset's labels as model class indices. Dataset class names may be the model's names, binomials
    ('Corvus corax'), common names or indices; a used class that matches none raises HieraxError."""
    lut = np.full(data.num_classes, -1, dtype=np.int64)
    for name, index in data.class_to_idx.items():
        found = taxonomy.index_of(name)
        lut[index] = -1 if found is None else found
    used = np.unique(data.labels)
    unknown = [data.class_names[i] for i in used if lut[i] < 0]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise HieraxError(f"{len(unknown)} dataset class(es) are not among the model's classes: {shown}")
    return lut[data.labels]


def write_report(
    report: dict,
    out: Path,
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    confusion_classes: int = 20,
) -> None:
    """Write report.json, summary.txt and (when images were evaluated) the two PNG figures into `out`, each
    atomically; `report["files"]` lists them."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if report["evaluated"]:
        files = {"confusion_matrix": out / "confusion_matrix.png", "reliability": out / "reliability.png"}
        plot_confusion(labels, preds, class_names, files["confusion_matrix"], confusion_classes)
        plot_reliability(report["reliability"], report["ece"], files["reliability"])
    files.update(report_json=out / "report.json", summary=out / "summary.txt")
    report["files"] = {k: str(v) for k, v in files.items()}
    text, summary = json.dumps(report, indent=2), format_summary(report) + "\n"
    atomic_write(files["report_json"], lambda tmp: Path(tmp).write_text(text, "utf-8"))
    atomic_write(files["summary"], lambda tmp: Path(tmp).write_text(summary, "utf-8"))


def evaluate(
    dataset: str | os.PathLike,
    model: ModelSpec = DEFAULT_MODEL,
    *,
    output_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    device=None,
    amp: bool = False,
    tta: bool = False,
    size: tuple[int, int] | int | None = None,
    common_names: str | os.PathLike | None = None,
    confusion_classes: int = 20,
    bins: int = 15,
    geo_prior: str | os.PathLike | GeoPrior | None = None,
    location: Sequence[float] | None = None,
    date: str | None = None,
    progress: bool = True,
    backend: str = "torch",
) -> dict:
    """Evaluate `model` on a labelled dataset (class folders, iNat21 JSON or CSV); returns the report dict and,
    with output_dir, writes report.json, summary.txt, confusion_matrix.png and reliability.png there.
    common_names (JSON index -> name, or iNat21 JSON) lets dataset labels be common names. geo_prior: also
    score the predictions re-weighted by a location prior (see the module docstring); location (LAT, LON) and
    date override every image's own."""
    # Inputs first, then the model: a dataset without images or a backbone stops before any image is read.
    size = check_size(size) if size is not None else None
    overrides = Overrides.from_args(location, date)
    if (overrides.has_location or overrides.date is not None) and geo_prior is None:
        raise HieraxError("--location and --date feed the location prior: give --geo-prior PRIOR as well")
    prior = load_geo_prior(geo_prior) if geo_prior is not None else None
    data = load_labelled(dataset, root=root)
    if len(data) == 0:
        raise HieraxError(f"no images found in the dataset {dataset}")
    places = None
    if prior is not None and str(dataset).lower().endswith(".json"):
        where = annotation_rows(dataset, root)
        places = [where.get(path, {}) for path in data.paths]
    net, info = resolve_model(model, device=device, size=size, backend=backend)
    require_classifier(info, "evaluate species predictions")
    names = load_common_names(common_names, info.class_names) if common_names else None
    model_labels = map_labels(data, Taxonomy(info.class_names, names))
    with_prior = _PriorScores(prior_for_model(prior, info), str(geo_prior)) if prior is not None else None
    transform = classification_transform(info.size, info.rgb_stats)
    loader = make_loader(
        data.paths,
        transform,
        batch_size=batch_size,
        workers=workers,
        labels=model_labels,
        meta=places,
        capture=overrides if prior is not None else None,
    )
    labels, top5, confidence, errors = [], [], [], []
    for result in iter_predictions(net, loader, amp=amp, tta=tta, progress=progress, total=len(data)):
        errors.extend((path, reason) for _, path, reason in result.errors)
        if result.probs is None:
            continue
        idx, vals = top_k(result.probs, 5)
        labels.append(result.labels)
        top5.append(idx)
        confidence.append(vals[:, 0])
        if with_prior is not None:
            with_prior.add(result)
    k = min(5, info.num_classes)
    report = {"model": str(model if not isinstance(model, tuple) else info.network), "dataset": str(dataset)}
    report.update(
        compute_metrics(
            np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
            np.concatenate(top5) if top5 else np.zeros((0, k), dtype=np.int64),
            np.concatenate(confidence) if confidence else np.zeros(0),
            info.class_names,
            bins=bins,
        )
    )
    report["failed"] = len(errors)
    report["errors"] = [{"path": p, "reason": r} for p, r in errors]
    if with_prior is not None:
        report["geo_prior"] = with_prior.report(
            np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
            np.concatenate(top5) if top5 else np.zeros((0, k), dtype=np.int64),
        )
    if output_dir is not None:
        labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        preds = np.concatenate(top5)[:, 0] if top5 else np.zeros(0, dtype=np.int64)
        write_report(report, Path(output_dir), labels_all, preds, info.class_names, confusion_classes)
    logger.debug("evaluation: top-1 %.4f top-5 %.4f on %d images", report["top1"], report["top5"], report["evaluated"])
    return report
