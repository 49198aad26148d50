"""fast_page_faults / keep_freed_memory: a large block freed and allocated again reuses its pages (no page faults)
or faults them in as huge pages and hands them back, and the user's own allocator tuning is left alone. The
allocation cases run in child processes: the settings are process-wide."""

import json
import os
import subprocess
import sys

import pytest

from hierax import runtime
from hierax.cli import main

pytestmark = pytest.mark.skipif(not runtime.has_glibc_malloc(), reason="glibc's malloc only")

# Allocate and fill a 64 MiB tensor (above glibc's largest adaptive mmap threshold, 32 MiB), free it, eight
# warm-up rounds, then count the page faults of each of six more rounds, and the resident memory once it is freed.
# "fast" checks the mechanism of huge pages, so it runs as outside a VM with free page reporting.
_CHILD = """
import json, resource, sys
from hierax import runtime
runtime.has_free_page_reporting = lambda: False
applied = {"keep": runtime.keep_freed_memory, "fast": runtime.fast_page_faults}.get(sys.argv[1], lambda: None)()
import torch
def rss_mib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(8):
    faults()
base = rss_mib()
block = torch.empty(16 << 20).fill_(1.0)
held = rss_mib() - base
del block
print(json.dumps({"applied": applied, "faults": [faults() for _ in range(6)], "held": held,
                  "freed": rss_mib() - base}))
"""

# The variables through which a user tunes the allocator (besides MALLOC_*_), which the tests start without.
_ALLOCATOR_ENV = ("GLIBC_TUNABLES", "HIERAX_KEEP_FREED_MEMORY", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def _clear_allocator_env(monkeypatch) -> None:
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + list(_ALLOCATOR_ENV):
        monkeypatch.delenv(key, raising=False)


def _run_child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_ENV and not k.startswith("MALLOC_")}
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


@pytest.mark.skipif(not runtime.has_transparent_huge_pages(), reason="the kernel offers no transparent huge pages")
def test_huge_pages_fault_large_blocks_in_2_mib_at_a_time_and_hand_them_back():
    default = _run_child("default")
    fast = _run_child("fast")
    assert fast["applied"] == "huge pages"
    # 64 MiB in 4 KiB pages is 16,384 faults; in 2 MiB pages 32 (a few more where the kernel has none to spare).
    assert max(fast["faults"]) < min(default["faults"]) / 4, (fast, default)
    # Unlike keep_freed_memory, the freed block leaves the process: its peak is not held.
    assert fast["held"] > 48 and fast["freed"] < 16, fast


def test_once_torch_is_loaded_it_keeps_freed_memory_instead(monkeypatch):
    _clear_allocator_env(monkeypatch)
    code = (
        "import torch, json; from hierax import runtime; runtime.has_free_page_reporting = lambda: False; "
        "print(json.dumps(runtime.fast_page_faults()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == "kept"


def test_the_kernel_setting_is_read(tmp_path):
    setting = tmp_path / "enabled"
    for text, offered in [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ]:
        setting.write_text(text)
        assert runtime.has_transparent_huge_pages(setting) is offered
    assert runtime.has_transparent_huge_pages(tmp_path / "missing") is False


def _balloon(root, name, device, features):
    folder = root / name
    folder.mkdir()
    (folder / "device").write_text(f"{device}\n")
    (folder / "features").write_text(f"{features}\n")


def test_free_page_reporting_is_read_from_the_balloon_device(tmp_path):
    reporting = "01100101" + "0" * 120  # a Firecracker balloon's features: bit 5 is VIRTIO_BALLOON_F_REPORTING
    _balloon(tmp_path, "virtio1", "0x0002", reporting)  # a block device with the same bit set means nothing
    _balloon(tmp_path, "virtio4", "not hex", reporting)
    assert runtime.has_free_page_reporting(tmp_path) is False
    _balloon(tmp_path, "virtio0", "0x0005", "01100001" + "0" * 120)  # a balloon without reporting
    assert runtime.has_free_page_reporting(tmp_path) is False
    _balloon(tmp_path, "virtio2", "0x0005", reporting)
    assert runtime.has_free_page_reporting(tmp_path) is True
    assert runtime.has_free_page_reporting(tmp_path / "missing") is False
    assert isinstance(runtime.has_free_page_reporting(), bool)  # this machine's own devices


def test_with_free_page_reporting_the_defaults_stay(monkeypatch):
    _clear_allocator_env(monkeypatch)
    monkeypatch.setattr(runtime, "has_free_page_reporting", lambda: True)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: pytest.fail("kept freed memory"))
    assert runtime.fast_page_faults() == ""
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ


@pytest.mark.parametrize(
    "env, left_alone",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, True),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
        ({"HIERAX_KEEP_FREED_MEMORY": "0"}, True),
        ({"THP_MEM_ALLOC_ENABLE": "0"}, True),
        ({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, False),
    ],
)
def test_users_own_malloc_tuning_is_left_alone(monkeypatch, env, left_alone):
    _clear_allocator_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime._user_tuned_malloc() is left_alone
    if left_alone:
        assert runtime.keep_freed_memory() is False
        assert runtime.fast_page_faults() == ""
        assert os.environ.get("THP_MEM_ALLOC_ENABLE") == env.get("THP_MEM_ALLOC_ENABLE")


def test_the_command_line_applies_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("hierax.cli.fast_page_faults", lambda: calls.append(True) or "kept")
    assert main(["models"]) == 0
    assert calls == [True]
    capsys.readouterr()
