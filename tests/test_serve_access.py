"""The service on an open network, through FastAPI's test client: API keys, CORS, rate limits, the bounded queue,
time-outs, /metrics and JSON access logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hierax.errors import HieraxError
from hierax.serve import access as access_module
from hierax.serve import create_app
from hierax.serve.access import KeyRing
from hierax.serve.limits import Admission, RateLimit, TokenBuckets
from hierax.serve.options import ServiceOptions
from tests.serve_support import chelsea_jpeg, tiny_model

KEY = "field-station-7f3a9c1e5b2d4680"
OTHER_KEY = "citizen-app-0c8e2f6a4b1d3957"
ORIGIN = "https://birds.example.org"


@pytest.fixture(scope="module")
def model():
    return tiny_model(size=32)


@pytest.fixture(scope="module")
def chelsea():
    return chelsea_jpeg()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    digest = hashlib.sha256(OTHER_KEY.encode()).hexdigest()
    path.write_text(f"# keys of hierax serve\n\n{KEY}  field station 3\nsha256:{digest} citizen-app\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def guarded(model, keys_file):
    net, info = model
    options = ServiceOptions(
        api_keys=KeyRing.load(keys_file), cors_origins=[ORIGIN], rate_limit=RateLimit(20, 60.0), log_json=True
    )
    with TestClient(create_app(net, info, name="tiny", options=options, load_seconds=1.25)) as client:
        yield client


def _post(client, key: str | None = None, header: str = "bearer"):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return client.post("/v1/classify", content=chelsea_jpeg(), headers={"Content-Type": "image/jpeg", **headers})


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code and body["detail"]
    return body


def test_keys_file_formats_and_errors(tmp_path, keys_file, caplog):
    ring = KeyRing.load(keys_file)
    assert len(ring) == 2
    assert ring.check(KEY) == "field station 3" and ring.check(OTHER_KEY) == "citizen-app"
    assert ring.check(KEY[:-1]) is None and ring.check("") is None and ring.check(f"sha256:{KEY}") is None
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{KEY}\nsha256:1234\n")
    with pytest.raises(HieraxError, match="line 2: a hashed key is sha256: and 64 hex digits"):
        KeyRing.load(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(HieraxError, match="holds no key"):
        KeyRing.load(empty)
    with pytest.raises(HieraxError, match="cannot read the API keys file"):
        KeyRing.load(tmp_path / "missing.txt")
    weak = tmp_path / "weak.txt"
    weak.write_text("short\n")
    weak.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="hierax.serve.access"):
        KeyRing.load(weak)
    assert "shorter than 16" in caplog.text and "chmod 600" in caplog.text and "short\n" not in caplog.text


def test_requests_without_a_valid_key_get_401(guarded):
    for response, code in (
        (_post(guarded), "missing_api_key"),
        (_post(guarded, "not-the-key"), "invalid_api_key"),
        (_post(guarded, "not-the-key", header="x-api-key"), "invalid_api_key"),
        (guarded.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), "missing_api_key"),
        (guarded.get("/metrics"), "missing_api_key"),
        (guarded.get("/v1/nothing"), "missing_api_key"),
    ):
        body = _error(response, 401, code)
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in body["detail"] and "not-the-key" not in body["detail"]
    assert _post(guarded, KEY).status_code == 200
    assert _post(guarded, OTHER_KEY, header="x-api-key").status_code == 200
    assert guarded.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    for path in ("/healthz", "/", "/static/app.js", "/static/style.css", "/openapi.json", "/docs"):
        assert guarded.get(path).status_code == 200, path
    schema = guarded.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/healthz"]["get"]["security"] == []


def test_keys_are_compared_by_hmac_compare_digest_against_every_digest(keys_file, monkeypatch):
    ring = KeyRing.load(keys_file)
    calls: list[tuple[bytes, bytes]] = []
    real = access_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access_module.hmac, "compare_digest", spy)
    for key, label in ((KEY, "field station 3"), (OTHER_KEY, "citizen-app"), ("wrong", None), (KEY + "x", None)):
        calls.clear()
        assert ring.check(key) == label
        assert len(calls) == len(ring)  # no early exit: as many comparisons for a right key as for a wrong one
        assert all(len(a) == len(b) == 32 for a, b in calls)  # sha256 digests, never the key text
        assert all(a == hashlib.sha256(key.encode()).digest() for a, _ in calls)


def test_cors_preflight_allows_only_the_given_origins(guarded):
    request = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = guarded.options("/v1/classify", headers={"Origin": ORIGIN, **request})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = guarded.options("/v1/classify", headers={"Origin": "https://evil.example.com", **request})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    answer = guarded.get("/v1/models", headers={"Origin": ORIGIN, "X-API-Key": KEY})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()
    denied = guarded.get("/v1/models", headers={"Origin": ORIGIN})  # a browser app can read why it was refused
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = guarded.get("/v1/models", headers={"Origin": "https://evil.example.com", "X-API-Key": KEY})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_rate_limit_per_key_answers_429_with_retry_after(model):
    net, info = model
    options = ServiceOptions(api_keys=KeyRing.from_keys([KEY, OTHER_KEY]), rate_limit=RateLimit.parse("3/min"))
    with TestClient(create_app(net, info, options=options)) as client:
        assert [_post(client, KEY).status_code for _ in range(3)] == [200] * 3
        limited = _post(client, KEY)
        body = _error(limited, 429, "rate_limited")
        assert "3/min" in body["detail"]
        assert 1 <= int(limited.headers["retry-after"]) <= 20  # one token comes back every 20 s
        assert _post(client, OTHER_KEY).status_code == 200  # another key has its own allowance
        assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200  # only model requests count
    with TestClient(create_app(net, info, options=ServiceOptions(rate_limit=RateLimit(1, 60.0)))) as client:
        assert [_post(client).status_code for _ in range(2)] == [200, 429]  # without keys: per client address


def test_token_buckets_refill_and_stay_bounded():
    now = [0.0]
    buckets = TokenBuckets(RateLimit(2, 60.0), max_clients=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(30.0)
    now[0] = 15.0
    assert buckets.take("a") == pytest.approx(15.0)  # half a token back after 15 s
    now[0] = 45.0
    assert buckets.take("a") == 0.0
    for i in range(1000):
        buckets.take(f"client{i}")
    assert len(buckets) == 3  # the least recently seen clients are dropped
    assert [RateLimit.parse(t) for t in ("60/min", "5/s", "1000/hour", "30")] == [
        RateLimit(60, 60.0),
        RateLimit(5, 1.0),
        RateLimit(1000, 3600.0),
        RateLimit(30, 60.0),
    ]
    for text in ("fast", "0/min", "5/fortnight", "-1/s"):
        with pytest.raises(HieraxError, match="rate-limit"):
            RateLimit.parse(text)


class SlowBody:
    """A request body that sends its first bytes, then waits for `release` before the rest (or forever)."""

    def __init__(self, data: bytes, release: asyncio.Event) -> None:
        self.data, self.release = data, release

    async def __aiter__(self):
        yield self.data[:100]
        await self.release.wait()
        yield self.data[100:]


def test_a_full_queue_answers_503_at_once_and_recovers(model, chelsea):
    net, info = model
    app = create_app(net, info, max_batch=2, options=ServiceOptions(max_queue=2))

    async def main():
        release = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            headers = {"Content-Type": "image/jpeg"}
            slow = [
                asyncio.ensure_future(c.post("/v1/classify", content=SlowBody(chelsea, release), headers=headers))
                for _ in range(2)
            ]
            while app.state.admission.depth < 2:
                await asyncio.sleep(0.01)
            refused = [await c.post("/v1/classify", content=chelsea, headers=headers) for _ in range(3)]
            release.set()
            done = await asyncio.gather(*slow)
            after = await c.post("/v1/classify", content=chelsea, headers=headers)
            health = (await c.get("/healthz")).json()
            return refused, done, after, health

    refused, done, after, health = asyncio.run(main())
    for response in refused:
        body = _error(response, 503, "overloaded")
        assert "2 requests in progress" in body["detail"] and int(response.headers["retry-after"]) >= 1
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert health["queue_depth"] == 0 and app.state.admission.refused == 3
    with pytest.raises(HieraxError, match="max-queue"):
        Admission(0)


def test_request_timeouts_in_the_upload_and_while_waiting_for_the_model(model, chelsea):
    net, info = model
    # a forming batch waits (max_wait_ms) for every announced item; one announced here, outside any request, is
    # held for the whole exchange, so the waiting request's deadline passes before its batch can run (a stalled
    # request's own announcement would not do: its deadline comes first and releases the batch)
    app = create_app(net, info, max_wait_ms=60_000, options=ServiceOptions(request_timeout=0.5))

    async def main():
        never = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            headers = {"Content-Type": "image/jpeg"}
            with app.state.model.batcher.expect():
                stalled = c.post("/v1/classify", content=SlowBody(chelsea, never), headers=headers)
                waiting = c.post("/v1/classify", content=chelsea, headers=headers)
                waiting, stalled = await asyncio.gather(waiting, stalled)
            return waiting, stalled, (await c.get("/healthz")).json()

    waiting, stalled, health = asyncio.run(main())
    body = _error(waiting, 503, "timeout")
    assert "0.5 s" in body["detail"] and int(waiting.headers["retry-after"]) >= 1
    assert "0.5 s" in _error(stalled, 408, "request_timeout")["detail"]
    assert health["queue_depth"] == 0
    with pytest.raises(HieraxError, match="request-timeout"):
        ServiceOptions(request_timeout=0)
    with pytest.raises(HieraxError, match="not an origin"):
        ServiceOptions(cors_origins=["birds.example.org"])


def _samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_parse_with_the_prometheus_parser(guarded):
    for _ in range(2):
        assert _post(guarded, OTHER_KEY).status_code == 200
    assert _post(guarded, "wrong").status_code == 401
    guarded.get("/healthz")
    text = guarded.get("/metrics", headers={"X-API-Key": KEY})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    families = _samples(text.text)

    def value(family: str, sample: str, **labels) -> float:
        found = [s.value for s in families[family] if s.name == sample and labels.items() <= s.labels.items()]
        assert len(found) == 1, (family, sample, labels, families[family])
        return found[0]

    ok = value("hierax_requests", "hierax_requests_total", endpoint="/v1/classify", method="POST", status="200")
    assert ok >= 2
    assert value("hierax_requests", "hierax_requests_total", endpoint="/v1/classify", status="401") >= 1
    assert value("hierax_requests", "hierax_requests_total", endpoint="/healthz", status="200") >= 1
    assert (
        value("hierax_request_duration_seconds", "hierax_request_duration_seconds_count", endpoint="/v1/classify") >= 3
    )
    batches = value("hierax_batch_size", "hierax_batch_size_count")
    assert batches >= 2 and value("hierax_batch_size", "hierax_batch_size_sum") >= batches
    assert value("hierax_batch_duration_seconds", "hierax_batch_duration_seconds_count") == batches
    assert value("hierax_queue_depth", "hierax_queue_depth") == 0
    assert value("hierax_batch_queue", "hierax_batch_queue") == 0
    assert value("hierax_model_load_seconds", "hierax_model_load_seconds", model="tiny") == 1.25
    assert value("hierax_model_info", "hierax_model_info", model="tiny", network="hieradet_d_tiny", classes="8") == 1


def test_json_access_log_lines_hold_no_key(guarded, caplog):
    with caplog.at_level(logging.INFO, logger="hierax.serve.access"):
        _post(guarded, KEY)
        _post(guarded, "a-wrong-key-1234")
        guarded.get("/v1/models?top_k=3", headers={"X-API-Key": OTHER_KEY})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hierax.serve.access"]
    assert [(line["endpoint"], line["status"], line["key"]) for line in lines] == [
        ("/v1/classify", 200, "field station 3"),
        ("/v1/classify", 401, None),
        ("/v1/models", 200, "citizen-app"),
    ]
    assert lines[2]["path"] == "/v1/models"  # no query string
    assert lines[0]["bytes_in"] == len(chelsea_jpeg()) and lines[0]["bytes_out"] > 0
    assert all(line["duration_ms"] >= 0 and line["method"] in ("GET", "POST") for line in lines)
    text = caplog.text
    assert KEY not in text and OTHER_KEY not in text and "a-wrong-key-1234" not in text
