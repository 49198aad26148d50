"""README.md stays true: its first block is the two set-up commands CI runs, its CLI table names every real
subcommand (and only those), every `hierax` command it shows parses with the flags shown, and its offline start
runs as written on Debian's Tux Paint stamps, serve and curl included."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hierax.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
STAMPS = Path("/usr/share/tuxpaint/stamps")
SETUP = ['pip install -e ".[dev]"', "python -m pytest -q"]
OFFLINE_HEADING = "## Offline start"
CLI_HEADING = "## Command line"
TRAIN_OUTPUTS = ("model.pt", "training_state.pt", "metrics.jsonl", "curves.png")  # as the README lists them
COMMAND_TIMEOUT_S = 300
SERVER_START_S = 120


def code_blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(the heading above it, its language, its lines) of every fenced block, in order."""
    blocks, heading, lang, body = [], "", None, []
    for line in text.splitlines():
        if lang is None and line.startswith("#"):
            heading = line.strip()
        elif line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((heading, lang, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_commands(lines: list[str]) -> list[list[str]]:
    """The commands of a shell block as argument lists: continuations joined, comments dropped."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [tokens for tokens in (shlex.split(c, comments=True) for c in joined) if tokens]


def hierax_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `hierax` (also in `torchrun ... -m hierax ...`), without a trailing `&`; else None."""
    tokens = tokens[:-1] if tokens[-1] == "&" else tokens
    if tokens[0] == "hierax":
        return tokens[1:]
    if tokens[0] == "torchrun" and "-m" in tokens:
        at = tokens.index("-m")
        return tokens[at + 2 :] if tokens[at + 1 : at + 2] == ["hierax"] else None
    return None


def readme_blocks() -> list[tuple[str, str, list[str]]]:
    return code_blocks(README.read_text("utf-8"))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: its parser} of a parser's subcommands (none: {})."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def test_first_block_is_the_two_setup_commands():
    _, lang, lines = readme_blocks()[0]
    assert lang == "bash"
    assert [line.strip() for line in lines if line.strip()] == SETUP


def test_cli_table_names_every_subcommand_and_only_real_ones():
    text = README.read_text("utf-8")
    table = text[text.index(CLI_HEADING) :].split("\n### ")[0]
    listed: dict[str, set[str]] = {}
    for cell in re.findall(r"^\| `hierax ([^`]+)`", table, flags=re.M):
        name, _, rest = cell.partition(" ")
        actions = rest.split(" ")[0].replace("\\|", "|")
        listed[name] = set(actions.split("|")) if re.fullmatch(r"[a-z]+(\|[a-z]+)+", actions) else set()
    real = subcommands(build_parser())
    assert set(listed) == set(real), "the CLI table and `hierax --help` differ"
    for name, actions in listed.items():
        if actions:
            assert actions == set(subcommands(real[name])), f"hierax {name}: the table's actions are not its actions"


def test_every_hierax_command_shown_parses():
    parser = build_parser()
    shown = 0
    for heading, lang, lines in readme_blocks():
        if lang != "bash":
            continue
        for tokens in shell_commands(lines):
            argv = hierax_argv(tokens)
            if argv is None:
                continue
            shown += 1
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"README ({heading}): `hierax {shlex.join(argv)}` does not parse")
    assert shown > 40


# ---- the offline start, run as written


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_commands() -> list[list[str]]:
    blocks = [lines for heading, lang, lines in readme_blocks() if heading.startswith(OFFLINE_HEADING)]
    assert blocks, f"README has no block under '{OFFLINE_HEADING}'"
    return shell_commands(blocks[0])


def option(argv: list[str], *names: str) -> str | None:
    for name in names:
        if name in argv:
            return argv[argv.index(name) + 1]
    return None


def run_hierax(argv: list[str], cwd: Path, env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hierax", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, f"`hierax {shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-3000:]}"


def check_outputs(argv: list[str], cwd: Path) -> None:
    """The files a command promises: its --output-dir's run files, its -o file; predict: a row per image."""
    out_dir = option(argv, "--output-dir")
    if out_dir:
        for name in TRAIN_OUTPUTS:
            assert (cwd / out_dir / name).is_file(), f"`hierax {argv[0]}` left no {out_dir}/{name}"
    out = option(argv, "-o", "--output")
    if out:
        assert (cwd / out).is_file(), f"`hierax {shlex.join(argv)}` wrote no {out}"
    if argv[0] == "predict" and out and out.endswith(".csv"):
        images = sorted(Path(argv[1]).rglob("*.png"))
        with open(cwd / out, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(r["path"] for r in rows) == [str(p) for p in images]


def start_server(argv: list[str], cwd: Path, env: dict, log) -> tuple[subprocess.Popen, str, str]:
    """Start `hierax serve` on a free port instead of the README's; (process, README port, new port)."""
    argv = list(argv)
    shown = option(argv, "--port")
    assert shown, "the README's serve line names its port"
    port = str(free_port())
    argv[argv.index("--port") + 1] = port
    proc = subprocess.Popen([sys.executable, "-m", "hierax", *argv], cwd=cwd, env=env, stdout=log, stderr=log)
    return proc, shown, port


def wait_until_healthy(proc: subprocess.Popen, port: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"hierax serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"hierax serve answered no /healthz within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post_file(url: str, path: str) -> dict:
    """What `curl -F file=@PATH URL` does, for machines without curl."""
    answer = httpx.post(url, files={"file": (Path(path).name, Path(path).read_bytes())}, timeout=60)
    answer.raise_for_status()
    return answer.json()


def run_curl(tokens: list[str], readme_port: str, port: str, cwd: Path) -> dict:
    tokens = [t.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}") for t in tokens]
    if shutil.which("curl"):
        done = subprocess.run(tokens + ["--fail", "-sS"], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"`{shlex.join(tokens)}` exited {done.returncode}: {done.stderr}"
        return json.loads(done.stdout)
    upload = option(tokens, "-F")
    assert upload and upload.startswith("file=@"), "the README's curl line uploads one file with -F file=@PATH"
    return post_file(tokens[-1], upload.removeprefix("file=@"))


@pytest.mark.slow  # about 50 s on 2 idle cores (training 2 epochs, an ONNX export), 95-105 s on a busy machine
def test_offline_start_runs_as_written(tmp_path):
    if not (STAMPS / "animals").is_dir():
        pytest.skip("Tux Paint stamps are not installed (apt-get install tuxpaint-stamps-default)")
    commands = offline_commands()
    env = {**os.environ, "HIERAX_HOME": str(tmp_path / "home"), "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    classes = {p.name for p in (STAMPS / "animals").iterdir() if p.is_dir()}
    server, ports, answers, served = None, None, [], ""
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        try:
            for tokens in commands:
                argv = hierax_argv(tokens)
                if argv is not None and tokens[-1] == "&":
                    assert argv[0] == "serve", "only `hierax serve` runs in the background"
                    server, *ports = start_server(argv, work, env, log)
                    wait_until_healthy(server, ports[1], log_path)
                    served = Path(option(argv, "--model")).parent.name  # a run's model.pt is served by its folder
                elif argv is not None:
                    run_hierax(argv, work, env)
                    check_outputs(argv, work)
                else:
                    assert tokens[0] == "curl" and ports, f"unexpected command in the offline start: {tokens}"
                    answers.append(run_curl(tokens, *ports, work))
        finally:
            if server is not None:
                stop(server)
    assert server is not None and answers, "the offline start serves the model and asks it about a photo"
    for answer in answers:
        assert answer["model"] == served
        labels = [p["label"] for p in answer["predictions"]]
        probs = [p["probability"] for p in answer["predictions"]]
        assert len(labels) == 5 and set(labels) <= classes
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    shutil.rmtree(work)  # about 650 MB of checkpoints and exports; kept for a look when the test fails
