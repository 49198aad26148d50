"""Where a batch job's rows and failures go (predict, embed and the detections run share it): a rank's chunked
row writer and errors file, or memory, and each photo's XMP sidecar when asked."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hierax.inference import writers
from hierax.inference.loading import BatchResult
from hierax.interchange.xmp import SidecarWriter

logger = logging.getLogger(__name__)


def default_errors_path(output: Path) -> Path:
    """`<output stem>.errors.csv` beside the output."""
    return output.with_name(f"{output.stem}.errors.csv")


@dataclass
class RunOutputs:
    """Where a rank's rows and failures go: files (chunked, published at the end) or memory; with `sidecars`,
    every row's photo also gets its XMP sidecar (one that cannot be written is a failure)."""

    writer: writers.RowWriter | None
    errors: writers.ErrorsWriter | None
    rows: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    sidecars: SidecarWriter | None = None

    def add(self, result: BatchResult, rows: list[dict]) -> None:
        if self.writer:
            self.writer.write(rows)
        else:
            self.rows.extend(rows)
        failures = [(path, reason) for _, path, reason in result.errors]
        if self.sidecars is not None:
            failures += self.sidecars.write_rows(rows)
        self.report(failures)

    def report(self, failures: list[tuple[str, str]]) -> None:
        """(path, reason) pairs to the errors file, or to the log and memory."""
        if self.errors:
            self.errors.write(failures)
        else:
            for path, reason in failures:
                logger.warning("%s: %s", path, reason)
            self.failures.extend(failures)

    def finish(self, ok: bool) -> None:
        """Publish the files (ok), or keep what is finished for --resume."""
        if self.sidecars is not None and self.sidecars.failed:
            where = self.errors.path if self.errors else "the log above"
            logger.warning("%d XMP sidecars could not be written: see %s", self.sidecars.failed, where)
        for out in (self.writer, self.errors):
            if out is not None and ok:
                out.close()
            elif out is not None:
                out.abandon()
