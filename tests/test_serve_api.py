"""The service through FastAPI's test client: every endpoint, the answers' content, and every bad input."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from hierax.inference.classification import infer_image
from hierax.serve import create_app, model_display_name
from hierax.transforms import classification_transform
from tests.serve_support import CLASS_NAMES, COMMON_NAMES, bomb_png, chelsea_jpeg, encode, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(size=32)


@pytest.fixture(scope="module")
def client(model):
    net, info = model
    app = create_app(net, info, name="tiny", common_names=COMMON_NAMES, max_upload_mb=0.25, max_wait_ms=1)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def chelsea():
    return chelsea_jpeg()


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


def test_classify_multipart_matches_direct_inference(client, model, chelsea, tmp_path):
    net, info = model
    response = client.post("/v1/classify", files={"file": ("chelsea.jpg", chelsea, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert [t.split(";")[0] for t in response.headers["server-timing"].split(", ")] == ["upload", "decode", "infer"]
    body = response.json()
    assert body["model"] == "tiny"
    assert body["image"] == {"width": 451, "height": 300}
    preds = body["predictions"]
    assert len(preds) == 5
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(chelsea)
    expected, _ = infer_image(net, path, classification_transform(info.size, info.rgb_stats))
    top = np.argsort(-expected[0])[:5]
    assert [p["index"] for p in preds] == top.tolist()
    np.testing.assert_allclose(probs, expected[0][top], rtol=1e-5, atol=1e-6)
    for p in preds:
        assert p["label"] == CLASS_NAMES[p["index"]]
        assert p["common_name"] == COMMON_NAMES[p["index"]]
        genus, epithet = CLASS_NAMES[p["index"]].split("_")[-2:]
        assert p["scientific_name"] == f"{genus} {epithet}"
        assert p["taxonomy"]["genus"] == genus and p["taxonomy"]["species"] == f"{genus} {epithet}"
        assert set(p["taxonomy"]) == {"kingdom", "phylum", "class", "order", "family", "genus", "species"}


def test_classify_raw_body_equals_multipart(client, chelsea):
    raw = client.post("/v1/classify?top_k=8", content=chelsea, headers={"Content-Type": "image/jpeg"})
    form = client.post("/v1/classify?top_k=8", files={"file": ("x.jpg", chelsea, "image/jpeg")})
    octet = client.post("/v1/classify?top_k=8", content=chelsea, headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == form.status_code == octet.status_code == 200
    assert raw.json()["predictions"] == form.json()["predictions"] == octet.json()["predictions"]
    assert len(raw.json()["predictions"]) == len(CLASS_NAMES)
    assert sum(p["probability"] for p in raw.json()["predictions"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_classify_other_formats(client, fmt):
    rng = np.random.default_rng(0)
    image = encode(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), fmt)
    response = client.post("/v1/classify?top_k=2", files={"file": (f"x.{fmt.lower()}", image, f"image/{fmt.lower()}")})
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 56, "height": 40}
    assert len(response.json()["predictions"]) == 2


def test_embed_matches_direct_inference(client, model, chelsea, tmp_path):
    net, info = model
    response = client.post("/v1/embed", files={"file": ("chelsea.jpg", chelsea, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    path = tmp_path / "c.jpg"
    path.write_bytes(chelsea)
    _, expected = infer_image(net, path, classification_transform(info.size, info.rgb_stats), return_embedding=True)
    assert body["embedding_size"] == net.embedding_size == len(body["embedding"])
    np.testing.assert_allclose(body["embedding"], expected[0], rtol=1e-5, atol=1e-5)


def test_models_health_openapi_and_page(client):
    models = client.get("/v1/models").json()
    assert models["max_upload_bytes"] == int(0.25 * 2**20)
    (card,) = models["models"]
    assert card["name"] == "tiny" and card["network"] == "hieradet_d_tiny"
    assert card["num_classes"] == len(CLASS_NAMES) and card["size"] == [32, 32] and card["embedding_size"] == 128
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["models"] == ["tiny"]
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/models", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="results"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty"),
        ({"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ({"content": b"hello, not a photo" * 10, "headers": {"Content-Type": "image/jpeg"}}, 422, "not_an_image"),
        ({"files": {"file": ("notes.jpg", b"%PDF-1.4 not a photo", "image/jpeg")}}, 422, "not_an_image"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type"),
        (
            {"content": b"a=b", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
        ),
        ({"files": {"file": ("notes.txt", b"just text", "text/plain")}}, 415, "unsupported_media_type"),
        ({"data": {"caption": "a cat"}, "files": {"other": ("", b"", "")}}, 400, "no_file"),
        ({"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}}, 400, "bad_request"),
        ({"content": bomb_png(), "headers": {"Content-Type": "image/png"}}, 422, "decompression_bomb"),
        (
            {"content": encode(np.zeros((4, 4, 3), np.uint8), "PNG"), "headers": {"Content-Type": "image/png"}},
            422,
            "too_small",
        ),
    ],
    ids=[
        "empty-raw",
        "empty-form",
        "text-raw",
        "text-form",
        "json",
        "urlencoded",
        "text-part",
        "no-file",
        "no-boundary",
        "bomb",
        "too-small",
    ],
)
def test_bad_input(client, kwargs, status, code):
    for path in ("/v1/classify", "/v1/embed"):
        _error(client.post(path, **kwargs), status, code)


def test_truncated_and_too_large(client, chelsea):
    half = chelsea[: len(chelsea) // 2]
    assert "truncated" in _error(
        client.post("/v1/classify", files={"file": ("t.jpg", half, "image/jpeg")}), 422, "truncated"
    )
    big = encode(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8), "PNG")
    assert len(big) > 0.25 * 2**20
    assert "0.2 MiB" in _error(
        client.post("/v1/classify", files={"file": ("b.png", big, "image/png")}), 413, "too_large"
    )
    _error(client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"}), 413, "too_large")


def test_request_errors_are_json(client):
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/classify"), 405, "method_not_allowed")
    _error(
        client.post("/v1/classify?top_k=0", content=b"x", headers={"Content-Type": "image/jpeg"}),
        422,
        "invalid_request",
    )


def test_verdict_follows_the_rollup():
    net, info = tiny_model(size=32)
    with torch.no_grad():
        net.classifier.bias.zero_()
        net.classifier.weight.mul_(0.0)
        net.classifier.bias[5] = net.classifier.bias[6] = 6.0
    image = encode(np.full((32, 32, 3), 120, np.uint8), "PNG")
    with TestClient(create_app(net, info, common_names=COMMON_NAMES)) as c:
        verdict = c.post("/v1/classify", content=image, headers={"Content-Type": "image/png"}).json()["verdict"]
        assert verdict["rank"] == "genus" and verdict["name"] == "Quercus" and verdict["uncertain"] is True
        assert verdict["probability"] == pytest.approx(2 / (2 + 6 * np.exp(-6.0)), rel=1e-4)
        with torch.no_grad():
            net.classifier.bias[0] = 12.0
        verdict = c.post("/v1/classify", content=image, headers={"Content-Type": "image/png"}).json()["verdict"]
        assert verdict["rank"] == "species" and verdict["name"] == "Felis catus" and verdict["uncertain"] is False
        assert verdict["common_name"] == "Domestic Cat"


def test_plain_class_names_have_no_verdict(chelsea):
    net, info = tiny_model(size=32, class_names=["cat", "dog", "oak"])
    with TestClient(create_app(net, info)) as c:
        body = c.post("/v1/classify", content=chelsea, headers={"Content-Type": "image/jpeg"}).json()
    assert body["verdict"] is None
    assert {p["scientific_name"] for p in body["predictions"]} == {"cat", "dog", "oak"}
    assert all(p["common_name"] is None for p in body["predictions"])


def test_concurrent_requests_share_forward_passes(model, chelsea):
    net, info = model
    app = create_app(net, info, max_batch=4, max_wait_ms=5000)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(
                *[c.post("/v1/classify", content=chelsea, headers={"Content-Type": "image/jpeg"}) for _ in range(8)]
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8
    assert len({tuple(p["index"] for p in r.json()["predictions"]) for r in responses}) == 1
    stats = app.state.model.batcher.stats
    assert (stats.batches, stats.items, stats.largest) == (2, 8, 4)


def test_served_names_say_which_model():
    assert model_display_name("runs/birds/model.pt") == "birds"  # what `hierax train --output-dir runs/birds` wrote
    assert model_display_name("exports/tiny-inat.safetensors") == "tiny-inat"
    assert model_display_name("hieradet_small_dino-v2-inat21") == "hieradet_small_dino-v2-inat21"
    assert model_display_name("model.pt") == "model"
