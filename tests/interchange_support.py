"""Camera-trap folders with a MegaDetector file, a tiny iNat21 model, and the crop pipeline as predict runs it."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import frictionless
import numpy as np
import torch
from PIL import Image, ImageFile
from skimage import data as skdata

from hierax.data.crops import CropDataset, CropPolicy, fill_from_stats, make_crop_loader
from hierax.data.taxonomy import Taxonomy
from hierax.inference.loading import iter_predictions
from hierax.interchange.megadetector import read_detections, select_detections
from hierax.interchange.results import classify
from hierax.models import create_model
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo

from .data_fixtures import TINY_CONFIG

CLASS_NAMES = [
    "00000_Animalia_Chordata_Mammalia_Carnivora_Canidae_Vulpes_vulpes",
    "00001_Animalia_Chordata_Mammalia_Carnivora_Canidae_Vulpes_lagopus",
    "00002_Animalia_Chordata_Mammalia_Carnivora_Felidae_Felis_catus",
    "00003_Animalia_Chordata_Mammalia_Artiodactyla_Cervidae_Capreolus_capreolus",
    "00004_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
    "00005_Plantae_Tracheophyta_Magnoliopsida_Fagales_Fagaceae_Quercus_robur",
]
COMMON = {0: "red fox", 2: "domestic cat", 4: "common raven"}
START = dt.datetime(2024, 5, 1, 6, 0, 0)

# (folder, name, seconds after START, detections [(category, conf, bbox)])
FRAMES = [
    ("cam1", "IMG_0001.JPG", 0, [("1", 0.93, [0.1, 0.2, 0.2, 0.3]), ("1", 0.55, [0.6, 0.5, 0.15, 0.2])]),
    ("cam1", "IMG_0002.JPG", 2, [("1", 0.88, [0.12, 0.22, 0.2, 0.3]), ("2", 0.9, [0.7, 0.1, 0.1, 0.4])]),
    ("cam1", "IMG_0003.JPG", 4, [("1", 0.1, [0.3, 0.3, 0.1, 0.1])]),  # below the threshold: blank
    (
        "cam1",
        "IMG_0004.JPG",
        600,
        [("1", 0.75, [0.4, 0.4, 0.3, 0.3]), ("1", 0.7, [0.0, 0.6, 0.2, 0.4]), ("1", 0.65, [0.8, 0.0, 0.2, 0.2])],
    ),
    ("cam2", "IMG_0001.JPG", 30, []),
    ("cam2", "IMG_0002.JPG", 31, [("3", 0.8, [0.5, 0.5, 0.4, 0.3])]),
    ("cam2", "IMG_0003.JPG", 100, [("1", 0.97, [0.25, 0.25, 0.5, 0.5])]),
    ("cam2", "broken.JPG", 105, [("1", 0.9, [0.1, 0.1, 0.3, 0.3])]),  # not decodable: becomes a failure
]


def camera_exif(when: dt.datetime, lat: float, lon: float) -> Image.Exif:
    """EXIF as a camera trap writes it: DateTimeOriginal and a GPS position."""
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)}
    exif[0x8769] = {0x9003: when.strftime("%Y:%m:%d %H:%M:%S")}
    return exif


def _dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    return Fraction(degrees), Fraction(minutes), Fraction(round((value - degrees - minutes / 60) * 3600, 2))


EXIF_DAY = dt.timedelta(days=1)  # EXIF times are a day after the file times, so the two cannot be mixed up
EXIF_PLACE = (52.1, 5.2)


def make_camera_folder(root: Path, *, size: tuple[int, int] = (320, 240), exif: bool = False) -> Path:
    """Frames from a real photo under root/cam1, root/cam2 (file times set) and root/md.json describing them, with
    a failed image as MegaDetector writes one. exif: cam1's frames carry DateTimeOriginal (a day after their file
    times) and EXIF_PLACE. Returns the MegaDetector file's path."""
    photo = skdata.astronaut()
    images = []
    for n, (folder, name, seconds, dets) in enumerate(FRAMES):
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith("broken"):
            path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
        else:
            shift = 25 * n
            extra = {}
            if exif and folder == "cam1":
                extra["exif"] = camera_exif(START + EXIF_DAY + dt.timedelta(seconds=seconds), *EXIF_PLACE)
            Image.fromarray(np.roll(photo, shift, axis=1)).resize(size).save(path, quality=90, **extra)
        stamp = (START + dt.timedelta(seconds=seconds)).timestamp()
        os.utime(path, (stamp, stamp))
        detections = [{"category": c, "conf": conf, "bbox": bbox} for c, conf, bbox in dets]
        images.append({"file": f"{folder}/{name}", "detections": detections})
    images.append({"file": "cam2/IMG_9999.JPG", "failure": "image access failure", "detections": None})
    doc = {
        "info": {
            "format_version": "1.4",
            "detector": "md_v5a.0.0.pt",
            "detection_completion_time": "2024-05-02 10:00:00",
            "detector_metadata": {"megadetector_version": "v5a.0.0", "typical_detection_threshold": 0.2},
        },
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": images,
    }
    md = root / "md.json"
    md.write_text(json.dumps(doc, indent=1))
    return md


def tiny_model(size: int = 64) -> tuple[torch.nn.Module, ModelInfo]:
    """A random-weight hieradet_d_tiny over CLASS_NAMES, with spread-out logits."""
    torch.manual_seed(0)
    net = create_model("hieradet_d_tiny", len(CLASS_NAMES), **TINY_CONFIG)
    with torch.no_grad():
        net.classifier.weight.mul_(400.0)
    info = ModelInfo.create("hieradet_d_tiny", {n: i for i, n in enumerate(CLASS_NAMES)}, size, config=TINY_CONFIG)
    return net.eval(), info


def classify_detections(md_path: Path, root: Path, *, k: int = 3, rollup: bool = True, policy: str = "square"):
    """What `hierax predict ROOT --detections MD` does with these pieces: (md, results, failures, taxonomy)."""
    net, info = tiny_model()
    taxonomy = Taxonomy(info.class_names, COMMON)
    md = read_detections(md_path)
    frames = select_detections(md, root, threshold=0.2, categories=["animal"])
    transform = classification_transform(info.size, info.rgb_stats)
    dataset = CropDataset(frames, transform, CropPolicy.parse(policy), fill_from_stats(info.rgb_stats))
    loader = make_crop_loader(dataset, batch_size=4, workers=0)
    results, failures = {}, {}
    for batch in iter_predictions(net, loader, progress=False, total=dataset.num_crops):
        frame_idx, det_idx = dataset.locate(batch.indices)
        if batch.probs is not None:
            found = classify(batch.probs, taxonomy, k=k, rollup=rollup, thresholds={"species": 0.8, "genus": 0.6})
            results.update({(int(f), int(d)): c for f, d, c in zip(frame_idx, det_idx, found)})
        failures.update({frame: reason for frame, _, reason in batch.errors})
    return md, results, failures, taxonomy


SCHEMAS = Path(__file__).parent / "data" / "camtrap-dp-1.0.2"


def frictionless_report(package_dir: Path, work: Path) -> frictionless.Report:
    """Validate a Camtrap DP package's tables against the local copies of the 1.0.2 schemas (tests/data, MIT), in a
    copy whose descriptor points at them (the tests are offline)."""
    shutil.copytree(package_dir, work)
    descriptor = json.loads((work / "datapackage.json").read_text())
    for resource in descriptor["resources"]:
        name = f"{resource['name']}-table-schema.json"
        assert resource["schema"] == f"https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/{name}"
        shutil.copy(SCHEMAS / name, work / name)
        resource["schema"] = name
    descriptor.pop("profile")
    return frictionless.validate(descriptor, basepath=str(work))


def megadetector_validator():
    """MegaDetector's own validator of batch-output files: path -> its validation_results. Importing megadetector
    sets Pillow's process-wide LOAD_TRUNCATED_IMAGES (its visualization module does, on import), which would make
    truncated photos decode in every later test; the flag is put back, so the import happens here."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    from megadetector.postprocessing.validate_batch_results import ValidateBatchResultsOptions, validate_batch_results

    ImageFile.LOAD_TRUNCATED_IMAGES = before
    options = ValidateBatchResultsOptions()
    options.check_image_existence = False
    return lambda path: validate_batch_results(str(path), options)["validation_results"]
