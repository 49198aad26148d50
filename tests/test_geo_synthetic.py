"""A generated world for the geo prior's tests: species with von Mises-Fisher ranges on the sphere (some
overlapping, two per region sharing a range but seen in opposite seasons), records written as an iNat21-format
annotation file, and the generator's own Bayes-optimal accuracy (it knows the true densities).

The tests in this file check the generator itself; test_geo_fit.py and test_geo_cli.py use it."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

YEAR = 2021
DAYS = 365
# Region centres (lat, lon) on several continents; each region holds SLOTS species.
REGIONS = [(45, -100), (-15, -55), (50, 10), (2, 22), (-25, 135), (35, 105), (20, 78), (62, 95)]
SLOTS = ("broad", "summer", "winter", "narrow")
SUMMER = (5, 6, 7, 8)
WINTER = (11, 12, 1, 2)


@dataclass(frozen=True)
class Species:
    index: int
    dir_name: str
    genus: str
    epithet: str
    lat: float
    lon: float
    kappa: float
    months: tuple[int, ...] | None  # None: all year
    weight: float
    region: int
    slot: int


def _unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def make_world(seed: int = 0) -> list[Species]:
    """len(REGIONS) x len(SLOTS) species. In each region: a broad all-year range, a summer and a winter species
    sharing one narrower range (only the date tells them apart), and a narrow all-year range that overlaps
    the broad one."""
    rng = np.random.default_rng(seed)
    world = []
    for r, (lat, lon) in enumerate(REGIONS):
        shift = rng.uniform(-6, 6, size=2)
        for s, slot in enumerate(SLOTS):
            index = r * len(SLOTS) + s
            genus, epithet = f"Genus{r}", f"{slot}{index}"
            c_lat, c_lon = (lat, lon) if slot == "broad" else (lat + shift[0], lon + shift[1])
            if slot == "narrow":
                c_lat, c_lon = lat - shift[0], lon - shift[1]
            kappa = {"broad": 30.0, "summer": 90.0, "winter": 90.0, "narrow": 160.0}[slot]
            months = {"summer": SUMMER, "winter": WINTER}.get(slot)
            name = f"{index:05d}_Animalia_Chordata_Aves_Order{r}_Family{r}_{genus}_{epithet}"
            world.append(Species(index, name, genus, epithet, c_lat, c_lon, kappa, months, rng.uniform(0.6, 1.4), r, s))
    return world


def class_names(world: list[Species]) -> list[str]:
    return [s.dir_name for s in world]


def lookalike(world: list[Species], index: int) -> int:
    """The species that looks like `index`: the same slot in the next region (another continent)."""
    s = world[index]
    return ((s.region + 1) % len(REGIONS)) * len(SLOTS) + s.slot


def _active_days(months: tuple[int, ...] | None) -> np.ndarray:
    days = np.arange(DAYS)
    if months is None:
        return days
    month_of = np.array([(dt.date(YEAR, 1, 1) + dt.timedelta(int(d))).month for d in days])
    return days[np.isin(month_of, months)]


def sample(world: list[Species], n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n records: (lat, lon, day index 0..364, species index), species drawn by weight."""
    rng = np.random.default_rng(seed)
    weights = np.array([s.weight for s in world])
    labels = rng.choice(len(world), size=n, p=weights / weights.sum())
    lat, lon, day = np.empty(n), np.empty(n), np.empty(n, dtype=np.int64)
    for s in world:
        rows = np.flatnonzero(labels == s.index)
        mu = _unit(np.array(s.lat), np.array(s.lon))
        u = rng.uniform(size=len(rows))
        w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * s.kappa)) / s.kappa  # Wood's vMF sampler on S^2
        helper = np.array([0.0, 0.0, 1.0]) if abs(mu[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        e1 = np.cross(mu, helper)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(mu, e1)
        phi = rng.uniform(0, 2 * np.pi, size=len(rows))
        tangent = np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2
        x = w[:, None] * mu + np.sqrt(np.clip(1 - w**2, 0, None))[:, None] * tangent
        lat[rows] = np.degrees(np.arcsin(np.clip(x[:, 2], -1, 1)))
        lon[rows] = np.degrees(np.arctan2(x[:, 1], x[:, 0]))
        day[rows] = rng.choice(_active_days(s.months), size=len(rows))
    return lat, lon, day, labels


def log_joint(world: list[Species], lat: np.ndarray, lon: np.ndarray, day: np.ndarray | None) -> np.ndarray:
    """log pi_s + log vMF_s(x) [+ log g_s(day)] for every record and species: (N, S)."""
    x = _unit(lat, lon)
    weights = np.array([s.weight for s in world])
    out = np.empty((len(lat), len(world)))
    for s in world:
        mu = _unit(np.array(s.lat), np.array(s.lon))
        log_norm = math.log(s.kappa) - math.log(2 * math.pi * (1 - math.exp(-2 * s.kappa)))
        out[:, s.index] = math.log(s.weight / weights.sum()) + log_norm + s.kappa * (x @ mu - 1.0)
        if day is not None:
            active = _active_days(s.months)
            inside = np.isin(day, active)
            out[:, s.index] += np.where(inside, -math.log(len(active)), -np.inf)
    return out


def bayes_rate(world: list[Species], lat: np.ndarray, lon: np.ndarray, day: np.ndarray | None) -> float:
    """The Bayes-optimal classifier's expected top-1 on these points: mean of max_s p(s | x[, day])."""
    logp = log_joint(world, lat, lon, day)
    logp -= logp.max(axis=1, keepdims=True)
    post = np.exp(logp)
    return float((post.max(axis=1) / post.sum(axis=1)).mean())


def date_text(day: int) -> str:
    """An iNat21-style date string for day index `day` of YEAR."""
    return f"{dt.date(YEAR, 1, 1) + dt.timedelta(int(day))} 10:00:00+00:00"


def write_annotations(
    path: Path, world: list[Species], lat, lon, day, labels, *, extra_categories: int = 0, unlocated: int = 0
) -> Path:
    """An iNat21-format annotation file of these records; `extra_categories` categories unknown to the model
    (one record each) and `unlocated` records with null, garbage or missing coordinates are added."""
    categories = [
        {
            "id": s.index,
            "name": f"{s.genus} {s.epithet}",
            "common_name": f"Bird {s.index}",
            "supercategory": "Birds",
            "kingdom": "Animalia",
            "phylum": "Chordata",
            "class": "Aves",
            "order": f"Order{s.region}",
            "family": f"Family{s.region}",
            "genus": s.genus,
            "specific_epithet": s.epithet,
            "image_dir_name": s.dir_name,
        }
        for s in world
    ]
    images, annotations = [], []
    for i in range(len(labels)):
        images.append(
            {
                "id": i,
                "file_name": f"train/{world[labels[i]].dir_name}/{i}.jpg",
                "width": 64,
                "height": 64,
                "latitude": round(float(lat[i]), 5),
                "longitude": round(float(lon[i]), 5),
                "date": date_text(int(day[i])),
            }
        )
        annotations.append({"id": i, "image_id": i, "category_id": int(labels[i])})
    base = len(images)
    for k in range(extra_categories):
        cid = 1000 + k
        categories.append({"id": cid, "name": f"Unknown species{k}", "image_dir_name": f"9{k:04d}_X_Y_Z_O_F_Unknown_x"})
        images.append({"id": base + k, "latitude": 10.0, "longitude": 10.0, "date": "2021-01-01 00:00:00+00:00"})
        annotations.append({"id": base + k, "image_id": base + k, "category_id": cid})
    broken = [{"latitude": None, "longitude": None}, {"latitude": "north", "longitude": 3.0}, {}]
    base = len(images)
    for k in range(unlocated):
        images.append({"id": base + k, "date": "2021-06-01 00:00:00+00:00", **broken[k % len(broken)]})
        annotations.append({"id": base + k, "image_id": base + k, "category_id": int(labels[k % len(labels)])})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_samples_follow_their_ranges_and_seasons():
    world = make_world()
    lat, lon, day, labels = sample(world, 4000, seed=1)
    assert np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180)
    summer = world[1]
    rows = labels == summer.index
    months = {(dt.date(YEAR, 1, 1) + dt.timedelta(int(d))).month for d in day[rows]}
    assert months <= set(SUMMER)
    # Most records of a species lie within 3 standard deviations (sqrt(1/kappa) radians) of its centre.
    cos_dist = _unit(lat[rows], lon[rows]) @ _unit(np.array(summer.lat), np.array(summer.lon))
    assert np.mean(np.degrees(np.arccos(np.clip(cos_dist, -1, 1))) < 3 * np.degrees(summer.kappa**-0.5)) > 0.95


def test_bayes_rate_is_the_accuracy_of_the_true_densities():
    world = make_world()
    lat, lon, day, labels = sample(world, 6000, seed=2)
    with_date, without = bayes_rate(world, lat, lon, day), bayes_rate(world, lat, lon, None)
    argmax_hits = np.mean(log_joint(world, lat, lon, day).argmax(axis=1) == labels)
    assert abs(argmax_hits - with_date) < 0.02  # the expected rate matches the realised one
    assert without < with_date - 0.05  # the seasonal pairs need the date
    assert with_date > 0.6
