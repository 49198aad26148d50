"""What the OpenAPI schema says beyond the routes: the upload body, the error answers and the API keys."""

from __future__ import annotations

from fastapi import FastAPI

from hierax.serve.schemas import ErrorBody

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image: a multipart form with the field `file`, or the raw image bytes",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "lat": {"type": "number", "description": "latitude, decimal degrees (with --geo-prior)"},
                        "lon": {"type": "number", "description": "longitude, decimal degrees (with --geo-prior)"},
                        "date": {"type": "string", "format": "date", "description": "when (with --geo-prior)"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS = {
    code: {"model": ErrorBody, "description": name.replace("_", " ")}
    for code, name in (
        (400, "empty or malformed upload"),
        (413, "upload too large"),
        (415, "not an image content type"),
        (422, "not a decodable image"),
        (401, "missing or wrong API key (with --api-keys)"),
        (429, "over the rate limit (with --rate-limit); see Retry-After"),
        (503, "busy: the queue is full or the model did not answer in time; see Retry-After"),
    )
}
SECURITY = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def document_keys(app: FastAPI) -> None:
    """Declare the two ways of sending a key in the OpenAPI schema, so /docs can send one."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY
            schema["security"] = [{name: []} for name in SECURITY]
            schema["paths"]["/healthz"]["get"]["security"] = []
        return app.openapi_schema

    app.openapi = openapi
