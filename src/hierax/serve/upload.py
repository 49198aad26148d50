"""Read one uploaded image from a request body, enforcing the size limit while the body streams in.

Accepted: `multipart/form-data` (the first file part, usually the field `file`, and small text fields such as
`lat`, `lon`, `date`), or a raw body typed `image/*` or `application/octet-stream` (or untyped). The body is
never read past the limit: a declared Content-Length over it is refused before reading, and a stream that grows
past it is cut off at that point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

MULTIPART_OVERHEAD = 64 * 1024
MAX_FORM_PARTS = 16
MAX_FIELD_BYTES = 1024
_RAW_TYPES = frozenset({b"", b"application/octet-stream"})
_FILE_FIELDS = frozenset({b"file", b"image", b"photo"})


class ApiError(HTTPException):
    """An HTTP error with a short machine-readable `code` next to its human-readable message."""

    def __init__(self, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers) if headers else None)
        self.code = code


@dataclass
class Upload:
    """An upload: the encoded image and the form's text fields (name -> value; empty for a raw body)."""

    data: bytes
    fields: dict[str, str] = field(default_factory=dict)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "too_large", f"upload too large: the limit is {max_bytes / 2**20:.1f} MiB")


def _is_image_type(ctype: bytes) -> bool:
    return ctype in _RAW_TYPES or ctype.startswith(b"image/")


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "bad_request", f"invalid Content-Length header: {value!r}") from None


async def read_image_upload(request: Request, max_bytes: int) -> bytes:
    """The encoded image bytes of a request; ApiError 400/413/415 when there is none, it is too big or mistyped."""
    return (await read_upload(request, max_bytes)).data


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image and text fields of a request; ApiError 400/413/415 when there is no image, it is too big or
    mistyped, or a text field is longer than MAX_FIELD_BYTES."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if not (ctype == b"multipart/form-data" or _is_image_type(ctype)):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type '{ctype.decode('latin-1')}' is not accepted: send the image as multipart/form-data "
            "(field 'file') or as the raw body typed image/* or application/octet-stream",
        )
    try:
        if ctype == b"multipart/form-data":
            upload = await _read_multipart(request, params.get(b"boundary"), max_bytes)
        else:
            upload = Upload(await _read_raw(request, max_bytes))
    except ClientDisconnect:
        raise ApiError(400, "disconnected", "the client closed the connection during the upload") from None
    if not upload.data:
        raise ApiError(400, "empty", "empty upload: the image has 0 bytes")
    return upload


async def _read_raw(request: Request, max_bytes: int) -> bytes:
    declared = _declared_length(request)
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


class _FirstFilePart:
    """Callbacks for python-multipart that keep the data of the first file part and the text fields, and drop
    everything else."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parts = 0
        self.found = False
        self.capturing = False
        self.content_type = b""
        self.data = bytearray()
        self.fields: dict[str, str] = {}
        self._text: bytearray | None = None
        self._text_name = ""
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise ApiError(400, "bad_request", f"too many form parts (at most {MAX_FORM_PARTS})")
        self._headers = {}

    def on_header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        is_file = b"filename" in disposition or disposition.get(b"name") in _FILE_FIELDS
        if not is_file and disposition.get(b"name"):
            self._text, self._text_name = bytearray(), disposition[b"name"].decode("utf-8", "replace")
            return
        if self.found or not is_file:
            return
        part_type, _ = parse_options_header(self._headers.get(b"content-type", b"").decode("latin-1"))
        if not _is_image_type(part_type):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"the uploaded file is '{part_type.decode('latin-1')}', not an image: "
                "upload a photo (JPEG, PNG, WebP, GIF, BMP or TIFF)",
            )
        self.found = self.capturing = True
        self.content_type = part_type

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise ApiError(400, "bad_request", f"form field '{self._text_name}' is over {MAX_FIELD_BYTES} bytes")
        if self.capturing:
            self.data += data[start:end]
            if len(self.data) > self.max_bytes:
                raise _too_large(self.max_bytes)

    def on_part_end(self) -> None:
        if self._text is not None:
            self.fields.setdefault(self._text_name, self._text.decode("utf-8", "replace"))
            self._text = None
        self.capturing = False


async def _read_multipart(request: Request, boundary: bytes | None, max_bytes: int) -> Upload:
    if not boundary:
        raise ApiError(400, "bad_request", "multipart/form-data without a boundary parameter")
    limit = max_bytes + MULTIPART_OVERHEAD
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise _too_large(max_bytes)
    collector = _FirstFilePart(max_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except (FormParserError, ValueError) as err:
        raise ApiError(400, "bad_request", f"malformed multipart body: {err}") from None
    if not collector.found:
        raise ApiError(400, "no_file", "the form has no file: send the image in a field named 'file'")
    return Upload(bytes(collector.data), collector.fields)
