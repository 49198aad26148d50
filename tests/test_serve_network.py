"""The real server (`python -m hierax serve` on 127.0.0.1) with everything an open network needs switched on:
keys, CORS, rate limits, a bounded queue, /metrics, JSON logs; a location prior, an index with thumbnails and the
user's species; a flood that fills the queue; and headless Chromium driving the page with a key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hierax.similar import ModelIdentity, build_index, embed_images
from hierax.similar.fewshot import fit_prototypes
from hierax.weights.files import write_checkpoint
from tests.serve_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    COMMON_NAMES,
    LiveServer,
    chelsea_jpeg,
    encode,
    hemisphere_prior,
    rss_mib,
    tiny_model,
    write_photos,
)

WEB_KEY = "web-4c1f9a7e2b8d6035e1a2"
API_KEY = "api-9e3b7c5a1f2d4068b7c9"
LIMITED_KEY = "limited-2a6d8f0b4c1e3957"
ORIGIN = "https://app.example.org"
RATE = 30


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint, common names, a keys file, a prior, an index of real photos and two species of the user's."""
    root = tmp_path_factory.mktemp("network")
    net, info = tiny_model(size=32)
    checkpoint = write_checkpoint(root / "tiny-inat.safetensors", net, info)
    other = write_checkpoint(root / "other.safetensors", *tiny_model(size=32, seed=1))
    names = root / "common.json"
    names.write_text(json.dumps({str(k): v for k, v in COMMON_NAMES.items()}))
    keys = root / "keys.txt"
    hashed = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys.write_text(f"{WEB_KEY} browser\nsha256:{hashed} api\n{LIMITED_KEY} limited\n")
    keys.chmod(0o600)
    prior = hemisphere_prior().save(root / "prior.safetensors")
    groups = write_photos(root / "photos", count=4)
    build_index(
        [p for g in groups.values() for p in g], str(checkpoint), output=root / "index", progress=False, workers=0
    )
    refs = groups["coffee"] + groups["astronaut"]
    _, vectors, _ = embed_images(refs, net, info, workers=0)
    identity = ModelIdentity.of(str(checkpoint), net, info)
    species = fit_prototypes(vectors, [0] * 5 + [1] * 5, ["my coffee", "my astronaut"], identity)
    species.save(root / "species.safetensors")
    return root, checkpoint, other, names, keys, prior


@pytest.fixture(scope="module")
def guarded(files):
    root, checkpoint, _, names, keys, prior = files
    args = [
        "--model", checkpoint, "--common-names", names, "--api-keys", keys, "--cors-origin", ORIGIN,
        "--rate-limit", f"{RATE}/min", "--max-queue", 1, "--request-timeout", 20, "--log-json",
        "--geo-prior", prior, "--index", root / "index", "--thumbnails",
        "--extra-species", root / "species.safetensors",
    ]  # fmt: skip
    with LiveServer.run(args, root / "guarded.log") as live:
        yield live


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _families(url: str, key: str | None = None) -> dict[str, list]:
    text = httpx.get(f"{url}/metrics", headers=_auth(key) if key else {}).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _count(families: dict[str, list], **labels) -> float:
    return sum(
        s.value
        for s in families["hierax_requests"]
        if s.name == "hierax_requests_total" and labels.items() <= s.labels.items()
    )


def _exhaust(url: str, key: str) -> int:
    """POST small photos with `key` until the rate limit answers 429; how many got through."""
    small = encode(np.full((64, 64, 3), 90, np.uint8), "PNG")
    with httpx.Client(base_url=url, timeout=30) as client:
        for sent in range(3 * RATE):
            response = client.post("/v1/classify", content=small, headers={"Content-Type": "image/png", **_auth(key)})
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1 and response.json()["error"] == "rate_limited"
                return sent
            assert response.status_code == 200, response.text
    pytest.fail(f"no 429 after {3 * RATE} requests")


def test_keys_cors_rate_limit_metrics_and_logs_over_http(guarded):
    chelsea = chelsea_jpeg()
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        photo = {"Content-Type": "image/jpeg"}
        missing = client.post("/v1/classify", content=chelsea, headers=photo)
        wrong = client.post("/v1/classify", content=chelsea, headers={**photo, "X-API-Key": "guess"})
        assert (missing.status_code, missing.json()["error"]) == (401, "missing_api_key")
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_api_key")
        assert client.post("/v1/classify", content=chelsea, headers={**photo, **_auth(WEB_KEY)}).status_code == 200
        hashed = client.post("/v1/classify", content=chelsea, headers={**photo, "X-API-Key": API_KEY})
        assert hashed.status_code == 200  # the file holds only this key's sha256
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
        allowed = client.options("/v1/classify", headers={"Origin": ORIGIN, **preflight})
        refused = client.options("/v1/classify", headers={"Origin": "https://elsewhere.example", **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert _exhaust(guarded.url, LIMITED_KEY) == RATE
    families = _families(guarded.url, API_KEY)
    assert _count(families, endpoint="/v1/classify", status="401") >= 2
    assert _count(families, endpoint="/v1/classify", status="429") >= 1
    assert _count(families, endpoint="/v1/classify", status="200") >= RATE + 2
    assert _count(families, method="OPTIONS") >= 2
    (load,) = [s.value for s in families["hierax_model_load_seconds"]]
    assert load > 0
    time.sleep(0.3)
    log = guarded.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) >= RATE + 6
    assert {line["key"] for line in lines} >= {"browser", "api", "limited", None}
    assert {line["status"] for line in lines} >= {200, 400, 401, 429}
    for secret in (WEB_KEY, API_KEY, LIMITED_KEY, "guess"):
        assert secret not in log
    assert "Traceback" not in log


def test_prior_similar_photos_and_species_over_http(guarded, files):
    root = files[0]
    with httpx.Client(base_url=guarded.url, timeout=30, headers=_auth(API_KEY)) as client:
        features = client.get("/v1/models").json()["features"]
        assert features == {
            "geo_prior": True,
            "similar_index": 20,
            "thumbnails": True,
            "extra_species": ["my coffee", "my astronaut"],
            "only_extra": False,
            "unknown_threshold": pytest.approx(features["unknown_threshold"]),
        }
        photo = (root / "photos" / "coffee_1.jpg").read_bytes()
        files_ = {"file": ("coffee.jpg", photo, "image/jpeg")}
        body = client.post("/v1/classify?top_k=10", files=files_, data={"lat": "-33.9", "lon": "151.2"}).json()
        assert body["geo"]["applied"] is True and body["geo"]["location_source"] == "request"
        assert {p["label"] for p in body["predictions"] if p["extra"]} == {"my coffee", "my astronaut"}
        assert body["decision"]["threshold"] == pytest.approx(features["unknown_threshold"])
        similar = client.post("/v1/similar?k=3", files=files_).json()
        first = similar["matches"][0]
        assert first["path"].endswith("coffee_1.jpg") and first["similarity"] == pytest.approx(1.0, abs=1e-4)
        thumb = client.get(first["thumbnail"])
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        assert httpx.get(guarded.url + first["thumbnail"]).status_code == 401  # a thumbnail needs a key too


def test_files_of_another_model_or_bad_flags_stop_the_start(files, cli):
    root, _, other, _, keys, _ = files

    def start(*args) -> subprocess.CompletedProcess:
        return cli("serve", "--device", "cpu", "--port", "9", *args)

    for args, message in (
        (["--model", other, "--index", root / "index"], "was made by another model"),
        (["--model", other, "--extra-species", root / "species.safetensors"], "was made by another model"),
        (["--model", other, "--only-extra"], "--only-extra needs --extra-species"),
        (["--model", other, "--rate-limit", "lots"], "is not a rate"),
        (["--model", other, "--api-keys", root / "nope.txt"], "cannot read the API keys file"),
    ):
        done = start(*args)
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_a_flood_fills_the_queue_gets_503_and_the_server_recovers(files, tmp_path, capsys):
    """A bounded load test: 48 clients x 6 requests against --max-queue 4. Every answer is 200 or an immediate 503
    with Retry-After; afterwards the queue is empty, a request succeeds and memory is where it was before."""
    _, checkpoint, *_ = files
    chelsea = chelsea_jpeg()

    async def flood(url: str, clients: int = 48, each: int = 6) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

            async def client() -> list[httpx.Response]:
                return [
                    await http.post("/v1/classify", content=chelsea, headers={"Content-Type": "image/jpeg"})
                    for _ in range(each)
                ]

            return [r for rs in await asyncio.gather(*[client() for _ in range(clients)]) for r in rs]

    args = ["--model", checkpoint, "--max-queue", 4, "--max-batch", 4, "--request-timeout", 30]
    with LiveServer.run(args, tmp_path / "flood.log") as live:
        # the heap grows to its working size over the first two floods (+30 and +11 MiB, then +0.1 per flood)
        warm = asyncio.run(flood(live.url)) + asyncio.run(flood(live.url))
        before = rss_mib(live.proc.pid)
        answers = asyncio.run(flood(live.url))
        deadline = time.monotonic() + 30
        while httpx.get(f"{live.url}/healthz").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(f"{live.url}/healthz").json()
        after_one = httpx.post(f"{live.url}/v1/classify", content=chelsea, headers={"Content-Type": "image/jpeg"})
        after = rss_mib(live.proc.pid)
        families = _families(live.url)
    statuses = [r.status_code for r in answers]
    busy = [r for r in answers if r.status_code == 503]
    with capsys.disabled():
        print(
            f"\nflood: {len(answers)} requests, {statuses.count(200)} x 200, {len(busy)} x 503, "
            f"{len(answers) - statuses.count(200) - len(busy)} other; RSS before {before:.1f} MiB, "
            f"after {after:.1f} MiB ({after - before:+.1f}); mean batch {health['mean_batch']:.2f}"
        )
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0 and len(busy) > 0
    assert all(r.json()["error"] == "overloaded" and int(r.headers["retry-after"]) >= 1 for r in busy)
    assert health["queue_depth"] == 0 and after_one.status_code == 200
    warm_busy = sum(r.status_code == 503 for r in warm)
    assert _count(families, endpoint="/v1/classify", status="503") == warm_busy + len(busy)
    assert after - before < 8, f"RSS grew by {after - before:.1f} MiB over one flood"


@pytest.mark.slow
def test_browser_with_a_key_location_similar_photos_and_a_busy_server(guarded, files, tmp_path):
    """Headless Chromium: the page asks for a key, refuses a wrong one, works with the right one (kept in
    localStorage), fills the place from the (fake) browser location, shows that the prior was applied and the
    similar photos with thumbnails, and says when the server is busy (503) or the key is over its limit (429)."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844},
                permissions=["geolocation"],
                geolocation={"latitude": -33.87, "longitude": 151.21},
            )
            page = context.new_page()
            page.goto(guarded.url + "/")
            page.wait_for_selector("#error:has-text('needs an API key')")
            assert page.locator("#key-panel").is_visible() and page.locator("#place").is_hidden()
            page.fill("#api-key", "not-my-key")
            page.click("#save-key")
            page.wait_for_selector("#key-status:has-text('refused')")
            page.fill("#api-key", WEB_KEY)
            page.click("#save-key")
            page.wait_for_selector("#model:has-text('tiny-inat')")
            assert page.evaluate("localStorage.getItem('hierax.apiKey')") == WEB_KEY
            assert page.locator("#error").is_hidden() and page.locator("#place").is_visible()

            page.click("#locate")
            page.wait_for_selector("#place-status:has-text('Location set')")
            assert page.input_value("#location") == "-33.87000, 151.21000"
            page.fill("#date", "2023-01-10")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#results li.prediction >> nth=4", timeout=30_000)
            geo = page.locator("#geo").inner_text()
            assert geo.startswith("Location prior applied: -33.8700, 151.2100 (from you), 2023-01-10 (from you)")
            model_names = page.locator("#results li.prediction:not(:has(.tag)) .scientific").all_inner_texts()
            assert model_names[0] == "Lynx rufus"  # the southern species, under the prior
            page.wait_for_selector("#similar .match img.thumb", timeout=30_000)
            assert page.locator("#similar .match").count() == 5
            assert page.locator("#similar .match-name").first.inner_text().endswith(".jpg")
            page.screenshot(path=str(tmp_path / "serve_page_key.png"), full_page=True)

            with _hold_the_queue(guarded):
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#error:has-text('The server is busy right now')", timeout=30_000)
                assert "Try again in" in page.locator("#error").inner_text()
            _exhaust(guarded.url, WEB_KEY)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#error:has-text('too many photos')", timeout=30_000)
            page.screenshot(path=str(tmp_path / "serve_page_busy.png"), full_page=True)
        finally:
            browser.close()


class _hold_the_queue:
    """Occupy the server's one queue place (--max-queue 1) with an upload that never finishes."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live

    def __enter__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=20)
        head = (
            "POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100000\r\n\r\n"
        )
        self.sock.sendall(head.encode() + b"\xff\xd8" + b"\x00" * 1000)
        deadline = time.monotonic() + 20
        while httpx.get(f"{self.live.url}/healthz").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the held upload never entered the queue"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.sock.close()
