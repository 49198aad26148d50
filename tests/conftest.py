"""Shared fixtures: the reference fill rule, tiny models, real photos, a local HTTP server and the CLI in-process."""

from __future__ import annotations

import json
import logging
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hierax.cli import QUIET_LOGGERS, main
from hierax.weights import catalog

DATA = Path(__file__).parent / "data"


def fill_reference(net: torch.nn.Module) -> None:
    """Set every state-dict entry by the fill rule of make_hieradet_reference.py (seeded by crc32 of its key)."""
    new = {}
    for key, tensor in net.state_dict().items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        values = torch.randn(tensor.shape, generator=g, dtype=torch.float32)
        is_norm_scale = tensor.ndim == 1 and key.endswith(".weight")
        new[key] = 1.0 + 0.1 * values if is_norm_scale else 0.02 * values
    net.load_state_dict(new)


@pytest.fixture(scope="session")
def reference_npz():
    arrays = np.load(DATA / "hieradet_reference.npz")
    meta = json.loads(bytes(arrays["meta.json"]).decode())
    return arrays, meta


TINY = {"depths": (1, 1, 1, 1), "embed_dim": 16}


def inat_names(n: int) -> list[str]:
    """n valid iNat21 class names (8 parts), two species per genus so roll-ups have something to sum."""
    genera = [("Corvidae", "Corvus"), ("Fagaceae", "Quercus"), ("Felidae", "Felis"), ("Canidae", "Canis")]
    names = []
    for i in range(n):
        family, genus = genera[(i // 2) % len(genera)]
        order = "Fagales" if genus == "Quercus" else "Passeriformes" if genus == "Corvus" else "Carnivora"
        cls = "Magnoliopsida" if genus == "Quercus" else "Aves" if genus == "Corvus" else "Mammalia"
        kingdom, phylum = ("Plantae", "Tracheophyta") if genus == "Quercus" else ("Animalia", "Chordata")
        names.append(f"{i:05d}_{kingdom}_{phylum}_{cls}_{order}_{family}_{genus}_species{i}")
    return names


@pytest.fixture(autouse=True)
def _forget_session_registrations():
    """Weights a test registers in-process (register_weights without persist) end with the test."""
    before = dict(catalog._SESSION)
    yield
    catalog._SESSION.clear()
    catalog._SESSION.update(before)


@pytest.fixture
def hierax_home(tmp_path, monkeypatch):
    """An empty per-test HIERAX_HOME cache."""
    home = tmp_path / "hierax_home"
    monkeypatch.setenv("HIERAX_HOME", str(home))
    monkeypatch.delenv("HIERAX_OFFLINE", raising=False)
    return home


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving registered byte strings, with failure modes."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.broken: set[str] = set()
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.hits[name] = server.hits.get(name, 0) + 1
                if name not in server.files:
                    self.send_error(404, "Not Found")
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if name in server.broken:
                    self.wfile.write(data[: len(data) // 3])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def one_thread():
    """One torch thread for the test: many small ops run far faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys, one_thread):
    """`hierax ARGS` run in this process, as a finished subprocess (returncode, stdout, stderr, its log lines
    included), at none of a fresh interpreter's start-up: importing torch alone takes seconds on a loaded machine.
    Keep real subprocesses for what only a process shows (signals, torchrun, the installed entry point)."""

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}  # the command sets these
        root.handlers.clear()  # so the command's logging.basicConfig writes to the captured stderr, as in a process
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, was in quiet.items():
                logging.getLogger(name).setLevel(was)
        out = capsys.readouterr()
        assert "Traceback" not in out.err, out.err
        return subprocess.CompletedProcess(["hierax", *argv], code, out.out, out.err)

    return run
