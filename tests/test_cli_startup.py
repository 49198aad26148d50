"""The `hierax` command itself, in subprocesses: what `--help` imports, a closed stdout, third-party logging (and
that the in-process `cli` fixture leaves logging as it found it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from hierax.cli import QUIET_LOGGERS
from tests.data_fixtures import make_checkpoint, write_image

HEAVY = ("torch", "torchvision", "matplotlib", "pyarrow", "fastapi", "onnx")

# Records, for each heavy library, the chain of hierax modules whose import brought it in (outermost first),
# then runs `hierax --help` and prints the records as JSON on stderr's last line.
IMPORT_WATCH = r"""
import importlib.abc, json, sys
HEAVY = set(sys.argv[1].split(","))
culprits = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in culprits and top not in sys.modules:
            frame, chain = sys._getframe(1), []
            while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "?") if frame is not None else "?"
            while frame is not None:
                module = frame.f_globals.get("__name__", "")
                if module.startswith("hierax") and (not chain or chain[-1] != module):
                    chain.append(module)
                frame = frame.f_back
            culprits[top] = chain[::-1] + ([importer] if importer not in chain else [])
        return None

sys.meta_path.insert(0, Watch())
from hierax.cli import main
try:
    main(["--help"])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "culprits": culprits}), file=sys.stderr)
"""


def _env() -> dict:
    return {**os.environ, "HIERAX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_help_imports_no_heavy_library():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WATCH, ",".join(HEAVY)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout and "serve" in result.stdout
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] == 0
    blamed = {}
    for library, chain in report["culprits"].items():
        command = next((m for m in chain if m.startswith("hierax.cli.")), None)
        blamed[library] = f"{command or chain[0]} (via {' -> '.join(chain)})" if chain else "?"
    assert not blamed, "hierax --help imports heavy libraries:\n" + "\n".join(f"  {k}: {v}" for k, v in blamed.items())


def _closed_stdout(*args: str) -> tuple[int, str]:
    """Run `hierax ARGS` with its stdout pipe closed before it writes (as `| head` does once it has enough)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hierax", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=120), err


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "tiny.pt", size=64)
    image = write_image(tmp_path / "one.jpg", 1)
    code, err = _closed_stdout("predict", str(image), "--model", str(checkpoint), "--workers", "0", "--quiet")
    assert code == 141 and "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


LOG_AFTER_MAIN = r"""
import logging, sys
from hierax.cli import main
code = main(sys.argv[1:])
for name in ("onnxscript", "PIL", "urllib3", "httpx", "matplotlib", "torch"):
    logging.getLogger(name).info("chatter from %s", name)
logging.getLogger("hierax.test").info("hierax says hello")
sys.exit(code)
"""


def test_third_party_loggers_quiet_unless_verbose():
    args = ["serve", "--max-batch", "0"]  # an error before anything loads: only the logging set-up runs
    quiet = subprocess.run([sys.executable, "-c", LOG_AFTER_MAIN, *args], capture_output=True, text=True, env=_env())
    assert quiet.returncode == 1 and "--max-batch must be at least 1" in quiet.stderr
    assert "hierax says hello" in quiet.stderr and "chatter" not in quiet.stderr, quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", LOG_AFTER_MAIN, "--verbose", *args], capture_output=True, text=True, env=_env()
    )
    assert all(f"chatter from {name}" in loud.stderr for name in ("onnxscript", "PIL", "urllib3")), loud.stderr


def test_the_in_process_cli_fixture_gives_logging_back_as_it_was(cli):
    """The fixture runs commands in the test process: the levels a command sets on third-party loggers must not
    leak into the tests that come after it."""
    before = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    assert cli("serve", "--max-batch", "0").returncode == 1
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == before


def test_train_workers_default_to_the_cpu_rule():
    from hierax.cli import build_parser
    from hierax.cli._options import system_kwargs
    from hierax.data.datasets import default_workers

    args = build_parser().parse_args(["train", "--data", "photos"])
    assert args.workers is None and system_kwargs(args)["num_workers"] == default_workers()
    args = build_parser().parse_args(["train", "--data", "photos", "--workers", "0"])
    assert system_kwargs(args)["num_workers"] == 0


def test_train_precision_flags_force_bf16_autocast_either_way():
    from hierax.cli import build_parser
    from hierax.cli._options import system_kwargs

    parse = build_parser().parse_args
    assert system_kwargs(parse(["train", "--data", "photos"]))["amp"] is None  # the engine decides: CUDA only
    assert system_kwargs(parse(["pretrain", "--data", "photos", "--amp"]))["amp"] is True
    assert system_kwargs(parse(["train", "--data", "photos", "--no-amp"]))["amp"] is False
    with pytest.raises(SystemExit):
        parse(["train", "--data", "photos", "--amp", "--no-amp"])
