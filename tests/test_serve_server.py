"""The real server: `hierax serve` in a subprocess on 127.0.0.1, over HTTP, raw sockets and headless Chromium."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from hierax.weights.files import write_checkpoint
from tests.serve_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CLASS_NAMES,
    COMMON_NAMES,
    LiveServer,
    chelsea_jpeg,
    tiny_model,
)

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m hierax serve` running a random-weight tiny model saved as .safetensors."""
    root = tmp_path_factory.mktemp("serve")
    net, info = tiny_model(size=32)
    checkpoint = write_checkpoint(root / "tiny-inat.safetensors", net, info)
    names = root / "common.json"
    names.write_text(json.dumps({str(k): v for k, v in COMMON_NAMES.items()}))
    args = ["--model", checkpoint, "--max-upload-mb", MAX_UPLOAD_MB, "--common-names", names]
    with LiveServer.run(args, root / "server.log") as live:
        yield live


def _raw_request(port: int, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request head and body chunks on a plain socket, then read whatever answer arrives."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while not answer.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
        return answer


def test_cli_server_classifies_over_http(server):
    chelsea = chelsea_jpeg()
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["models"][0]["name"] == "tiny-inat" and models["max_upload_bytes"] == MAX_UPLOAD_MB * 2**20
    files = {"file": ("chelsea.jpg", chelsea, "image/jpeg")}
    response = httpx.post(f"{server.url}/v1/classify", files=files, timeout=30)
    assert response.status_code == 200, response.text
    preds = response.json()["predictions"]
    assert len(preds) == 5
    assert all(p["common_name"] == COMMON_NAMES[p["index"]] for p in preds)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        embed = client.post("/v1/embed", content=chelsea, headers={"Content-Type": "image/jpeg"})
        assert embed.status_code == 200 and embed.json()["embedding_size"] == 128
        bad = client.post("/v1/classify", content=b"not a photo", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 422 and bad.json()["error"] == "not_an_image"


def test_declared_oversize_is_refused_before_the_body_is_sent(server):
    port = server.port
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    answer = _raw_request(port, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"too_large"' in answer


def test_streamed_upload_is_cut_off_at_the_limit(server):
    """A chunked body with no declared length: the answer arrives after ~1 MiB although the body never ends."""
    port = server.port
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"\xff" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (2 * MAX_UPLOAD_MB * 16)
    answer = _raw_request(port, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"too_large"' in answer
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_client_leaving_mid_upload_is_not_a_server_error(server):
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head + b"\xff\xd8" + b"\x00" * 1000)
        time.sleep(0.2)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    time.sleep(0.3)
    log = server.log.read_text()
    assert "Traceback" not in log and "500 Internal" not in log, log[-2000:]


@pytest.mark.slow
def test_browser_end_to_end(server, tmp_path):
    """Headless Chromium on a phone-sized viewport: upload chelsea, read the five bars, drop a bad file."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg())
    species = {" ".join(n.split("_")[-2:]): COMMON_NAMES[i] for i, n in enumerate(CLASS_NAMES)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('tiny-inat')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#results li.prediction >> nth=4", timeout=30_000)
            items = page.locator("#results li.prediction")
            assert items.count() == 5
            for i in range(5):
                common = items.nth(i).locator(".common").inner_text()
                scientific = items.nth(i).locator(".scientific").inner_text()
                assert species[scientific] == common
                assert items.nth(i).locator(".prob").inner_text().endswith("%")
                genus = scientific.split()[0]
                assert items.nth(i).locator(".taxonomy").inner_text().split(" › ")[-1] == genus
                assert float(items.nth(i).locator(".bar").get_attribute("aria-valuenow")) > 0
            assert page.locator("#preview").is_visible()
            assert page.locator("#verdict").is_visible() and "Not sure" in page.locator("#verdict").inner_text()
            assert page.locator("#error").is_hidden()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)

            data_transfer = page.evaluate_handle(
                """() => { const dt = new DataTransfer();
                   dt.items.add(new File(["this is not a photo"], "broken.jpg", {type: "image/jpeg"}));
                   return dt; }"""
            )
            page.dispatch_event("#drop", "drop", {"dataTransfer": data_transfer})
            page.wait_for_selector("#error", state="visible", timeout=30_000)
            message = page.locator("#error").inner_text()
            assert message.startswith("Cannot identify broken.jpg: not an image") and "Choose a photo" in message
            assert page.locator("#results li.prediction").count() == 0
            page.screenshot(path=str(tmp_path / "serve_page_error.png"), full_page=True)
        finally:
            browser.close()
