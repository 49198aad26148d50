"""hierax's own exception types: each message says what went wrong and what to do about it."""


class HieraxError(Exception):
    """Base class of every error hierax raises on purpose; the CLI prints its message, not a traceback."""


class ModelNotFoundError(HieraxError, KeyError):
    """A model name that is neither a registered weight, a network, nor an existing file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(HieraxError):
    """A checkpoint file that cannot be read, is incomplete, or belongs to another architecture."""


class NoClassifierError(HieraxError):
    """A backbone without a classifier (0 classes) was asked for species: it gives embeddings only."""


class DownloadError(HieraxError):
    """A download failed: network error, HTTP error, or a sha256 mismatch."""


class OfflineError(DownloadError):
    """A file is needed but hierax may not download it (no network or HIERAX_OFFLINE=1)."""


class ImageDecodeError(HieraxError, ValueError):
    """An input that is not a decodable image. `reason` is a stable code for programs: empty, truncated,
    not_an_image, decompression_bomb, too_small, not_found or unreadable."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason
