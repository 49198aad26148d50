"""keep_freed_memory: a large block freed and allocated again reuses its pages (no page faults), and the user's
own malloc tuning is left alone. The allocation cases run in child processes: the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

from hierax import runtime
from hierax.cli import main

pytestmark = pytest.mark.skipif(not runtime.has_glibc_malloc(), reason="glibc's malloc only")

# Allocate and fill a 64 MiB tensor (above glibc's largest adaptive mmap threshold, 32 MiB), free it, eight
# warm-up rounds, then count the page faults of each of six more rounds.
_CHILD = """
import json, resource, sys, torch
from hierax.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(8):
    faults()
print(json.dumps({"applied": applied, "faults": [faults() for _ in range(6)]}))
"""


def _run_child(mode: str) -> dict:
    ours = ("GLIBC_TUNABLES", "HIERAX_KEEP_FREED_MEMORY", "LD_PRELOAD")
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    default = _run_child("default")
    kept = _run_child("keep")
    assert kept["applied"] is True
    # 64 MiB is 16,384 pages of 4 KiB, or 32 transparent huge pages where the kernel backs mmap with them.
    assert min(default["faults"]) >= 32, f"glibc's default maps the block afresh each round: {default}"
    # An aligned request is a little larger than the block it freed, so the heap may grow beside it in the first
    # rounds (seen: up to five times); after the warm-up every block is reused as it is.
    assert max(kept["faults"]) < 16, kept


@pytest.mark.parametrize(
    "env, left_alone",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, True),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
        ({"HIERAX_KEEP_FREED_MEMORY": "0"}, True),
        ({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, False),
    ],
)
def test_users_own_malloc_tuning_is_left_alone(monkeypatch, env, left_alone):
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime._user_tuned_malloc() is left_alone
    if left_alone:
        assert runtime.keep_freed_memory() is False


def test_the_command_line_applies_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("hierax.cli.keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["models"]) == 0
    assert calls == [True]
    capsys.readouterr()
