"""Detection boxes to classify, as plain values (no torch), shared by the detection readers and the crop dataset.

Box: MegaDetector's normalised (x_min, y_min, width, height), each in 0..1 of the image's width or height.
FrameBoxes(frame, path, boxes): one frame's index in its detections file, the path to open, and its selected
boxes as ((detection index, Box), ...).
"""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class FrameBoxes:
    """One frame to crop: its index in the detections file, the path to open and its (detection index, box)s."""

    frame: int
    path: str
    boxes: tuple[tuple[int, Box], ...]
