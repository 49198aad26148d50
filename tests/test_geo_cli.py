"""`hierax geoprior fit|info|map` through the real command line, in subprocesses: outputs, messages for bad input,
and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from hierax.geo import load_prior
from hierax.geo.fit import state_path_for
from tests.test_geo_synthetic import class_names, make_world, sample, write_annotations


def hierax(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hierax", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("geocli")
    world = make_world()
    annotations = write_annotations(
        tmp / "train.json", world, *sample(world, 2000, seed=1), extra_categories=1, unlocated=2
    )
    classes = tmp / "classes.txt"
    classes.write_text("\n".join(class_names(world)) + "\n")
    return tmp, annotations, classes


@pytest.fixture(scope="module")
def fitted_prior(world_files):
    tmp, annotations, classes = world_files
    output = tmp / "prior.safetensors"
    done = hierax("geoprior", "fit", annotations, "--model", classes, "--output", output, "--epochs", 2, "--quiet")
    assert done.returncode == 0, done.stderr
    return output, done


def test_fit_writes_a_prior_and_reports_what_it_skipped(fitted_prior):
    output, done = fitted_prior
    assert "2,000 of 2,003 records used" in done.stdout
    assert "skipped 1 records without a location" in done.stdout
    assert "skipped 1 records with a broken location" in done.stdout
    assert "skipped 1 records of 1 categories that match no model class" in done.stdout
    assert f"prior: {output}" in done.stdout and "Traceback" not in done.stderr
    assert not state_path_for(output).exists()  # removed once the fit completes
    prior = load_prior(output)
    assert prior.uses_date and prior.num_classes == 32 and prior.fit_summary["used"] == 2000


def test_info_describes_the_prior(fitted_prior, cli):
    output, _ = fitted_prior
    text = cli("geoprior", "info", output)
    assert text.returncode == 0 and "location and date" in text.stdout and "classes_with_records: 32" in text.stdout
    info = json.loads(cli("geoprior", "info", output, "--json").stdout)
    assert info["classes"] == 32 and info["hyperparameters"]["epochs"] == 2 and info["file_size_mib"] > 0


def test_map_draws_a_species_by_binomial_or_common_name(fitted_prior, tmp_path, cli):
    output, _ = fitted_prior
    for species in ("Genus0 summer1", "Bird 1"):
        png = tmp_path / "map.png"
        done = cli("geoprior", "map", output, "--species", species, "--output", png, "--date", "2021-07-01")
        assert done.returncode == 0, done.stderr
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 800
    missing = cli("geoprior", "map", output, "--species", "Dodo", "--output", tmp_path / "x.png")
    assert missing.returncode == 1 and "no species 'Dodo'" in missing.stderr and "Traceback" not in missing.stderr
    bad_date = cli("geoprior", "map", output, "--species", "Bird 1", "--output", tmp_path / "x.png", "--date", "July")
    assert bad_date.returncode == 1 and "YYYY-MM-DD" in bad_date.stderr


def test_bad_inputs_get_one_line_errors(world_files, tmp_path, cli):
    tmp, annotations, classes = world_files
    out = tmp_path / "p.safetensors"
    (tmp_path / "other.txt").write_text("Alces alces\nUrsus arctos\n")
    (tmp_path / "coco.json").write_text('{"images": [], "annotations": []}')
    cases = {
        "no such annotation file": ("fit", tmp_path / "nope.json", "--model", classes, "--output", out),
        "not an iNat21-format annotation file": ("fit", tmp_path / "coco.json", "--model", classes, "--output", out),
        "no category matches": ("fit", annotations, "--model", tmp_path / "other.txt", "--output", out),
        "no such class list": ("fit", annotations, "--model", tmp_path / "nope.txt", "--output", out),
        "geo prior not found": ("info", tmp_path / "nope.safetensors"),
        "not a readable safetensors file": ("info", annotations),
    }
    for message, args in cases.items():
        done = cli("geoprior", *args)
        assert done.returncode == 1, (message, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _weights(path):
    return {k: v.clone() for k, v in load_prior(path).net.state_dict().items()}


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights(world_files, tmp_path, cli):
    _, annotations, classes = world_files
    common = ["--model", classes, "--epochs", 3, "--batch-size", 16, "--checkpoint-every", 5, "--quiet"]
    whole = tmp_path / "whole.safetensors"
    assert cli("geoprior", "fit", annotations, "--output", whole, *common).returncode == 0

    cut = tmp_path / "cut.safetensors"
    state = state_path_for(cut)
    cmd = [sys.executable, "-m", "hierax", "geoprior", "fit", str(annotations), "--output", str(cut), *map(str, common)]
    # one thread, as the in-process runs (the `cli` fixture), so the weights can match bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(state, weights_only=True)
    assert 0 < saved["step"] < saved["total_steps"]  # killed mid-run

    resumed = cli("geoprior", "fit", annotations, "--output", cut, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()

    again = cli("geoprior", "fit", annotations, "--output", cut, *common)
    assert again.returncode == 0  # a finished fit leaves no state behind, so a new run starts cleanly
