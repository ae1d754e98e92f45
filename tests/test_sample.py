"""`mfrae sample` at tiny size: streamed shards, determinism over process counts and batch sizes, resume, torchrun.

Checked against independent truth: two gloo processes under the real torchrun must write the byte-identical
samples.npz of one process; another batch size the same images up to a rare truncation flip; a run that dies
after some shards and is resumed the same files as an uninterrupted one, without touching complete shards; and
the argv of every `sample`, `eval` and `train` option must pass through torchrun's own parser intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.run import get_args_parser

from conftest import save_tiny_sampling_models
from mfrae import sample_shards
from mfrae.cli import build_parser, main
from mfrae.eval.samples import to_uint8_nhwc
from mfrae.generation import SampleSettings, generate, generate_indices, prefetched_noise, sample_noise

# One thread here and OMP_NUM_THREADS=1 in subprocesses: the same kernels everywhere, so files compare byte for byte.
pytestmark = pytest.mark.usefixtures("one_thread")

NUM, SHARD, BATCH = 20, 6, 3  # 4 shards (the last one short); batches never cross a shard


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny MeanFlow student, teacher and 32 px ViT decoder saved as mfrae model files."""
    return save_tiny_sampling_models(tmp_path_factory.mktemp("tiny"))


def argv(models, out: Path, *extra: str, ckpt: str = "student") -> list[str]:
    return ["sample", "--ckpt", str(models[ckpt]), "--decoder", str(models["decoder"]), "--num-samples", str(NUM),
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--device", "cpu", "--out", str(out), *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """One process, the reference every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "samples"
    assert main(argv(models, out, "--steps", "2")) == 0
    return out


#################################################################################
#                       Output layout and streaming                             #
#################################################################################


def test_writes_shards_pngs_grid_and_an_adm_npz(reference):
    images, labels = npz(reference / "samples.npz")
    assert images.dtype == np.uint8 and images.shape == (NUM, 32, 32, 3)
    assert images.astype(float).std(axis=0).mean() > 5  # samples differ: comparisons below test the noise
    assert labels.dtype == np.int64 and sorted(np.bincount(labels, minlength=10)) == [2] * 10
    shards = sorted((reference / "shards").glob("*.npz"))
    assert [p.name for p in shards] == [f"shard_{k:06d}.npz" for k in range(4)]
    # each shard holds at most --shard-size images (host memory follows the batch size; benchmarks/sample_memory.py)
    assert all(p.stat().st_size < SHARD * 32 * 32 * 3 + 4096 for p in shards)
    assert np.array_equal(np.concatenate([npz(p)[0] for p in shards]), images)
    pngs = sorted((reference / "images").glob("*.png"))
    assert len(pngs) == NUM and (reference / "grid.png").is_file()
    assert (reference / "images/labels.txt").read_text().split() == [str(v) for v in labels]
    report = json.loads((reference / "sampling.json").read_text())
    assert report["nfe"] == 2 and report["generated"] == NUM and report["images_per_second"] > 0


def test_streamed_npz_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8), rng.integers(0, 10, 7)
    path = sample_shards.write_adm_npz(tmp_path / "a.npz", 7, [(images[:3], labels[:3]), (images[3:], labels[3:])])
    got_images, got_labels = npz(path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert sample_shards.npz_shapes(path) == {"arr_0": (7, 4, 5, 3), "arr_1": (7,)}
    path.write_bytes(path.read_bytes()[:-40])  # truncated: detected, not trusted
    with pytest.raises(ValueError, match="not a complete"):
        sample_shards.npz_shapes(path)


def test_noise_depends_only_on_seed_and_index(models):
    shape = (8, 4, 4)
    whole = sample_noise(shape, range(0, 10), seed=3)
    assert torch.equal(whole[4:7], sample_noise(shape, range(4, 7), seed=3))
    assert not torch.equal(whole, sample_noise(shape, range(0, 10), seed=4))
    pieces = [range(0, 4), range(4, 8), range(8, 10)]
    for prefetch in (False, True):  # drawn ahead in a thread (accelerators) or in turn: the same noise
        assert torch.equal(torch.cat(list(prefetched_noise(shape, pieces, 3, prefetch))), whole)


def test_generate_in_memory_matches_the_command(models, reference):
    from mfrae.checkpoint import load_dit_dh, load_vit_decoder
    from mfrae.models.rae import RAE

    _, labels = npz(reference / "samples.npz")
    model = load_dit_dh(str(models["student"])).eval()
    rae = RAE(None, load_vit_decoder(str(models["decoder"])), None).eval()
    images = generate(model, rae, torch.from_numpy(labels[:5]), SampleSettings(steps=2, batch_size=BATCH))
    assert np.abs(to_uint8_nhwc(images).astype(int) - npz(reference / "samples.npz")[0][:5]).max() <= 1
    # any subset of indices (a process's strided share) gives those samples
    share = generate_indices(model, rae, torch.from_numpy(labels), torch.arange(1, NUM, 7), SampleSettings(steps=2))
    assert np.abs(to_uint8_nhwc(share).astype(int) - npz(reference / "samples.npz")[0][1::7]).max() <= 1


#################################################################################
#                       Determinism and distribution                            #
#################################################################################


def test_two_torchrun_processes_and_another_batch_size_give_the_same_samples(models, reference, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mfrae",
           *argv(models, tmp_path / "two", "--steps", "2")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(tmp_path / "two/samples.npz") == digest(reference / "samples.npz")
    assert json.loads((tmp_path / "two/sampling.json").read_text())["world_size"] == 2

    assert main([*argv(models, tmp_path / "batch5", "--steps", "2"), "--batch-size", "5"]) == 0
    (a, la), (b, lb) = npz(reference / "samples.npz"), npz(tmp_path / "batch5/samples.npz")
    assert np.array_equal(la, lb)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # kernel rounding can flip a truncation, rarely


def test_grid_option_is_an_explicit_meanflow_grid(models, reference, tmp_path):
    assert main(argv(models, tmp_path / "grid", "--grid", "1,0.5,0")) == 0  # the uniform 2-step grid
    assert digest(tmp_path / "grid/samples.npz") == digest(reference / "samples.npz")
    assert main(argv(models, tmp_path / "bad", "--grid", "1,0.5,0", "--steps", "3")) == 2
    assert main(argv(models, tmp_path / "teacher", "--grid", "1,0", ckpt="teacher")) == 2
    assert main(argv(models, tmp_path / "bad", "--grid", "1,1,0")) == 2  # not strictly decreasing
    assert not (tmp_path / "bad").exists() and not (tmp_path / "teacher").exists()


def test_bf16_autocast_of_backbone_and_decoder_stays_close(models, reference, tmp_path):
    assert main(argv(models, tmp_path / "bf16", "--steps", "2", "--bf16", "--decoder-bf16")) == 0
    a, b = npz(reference / "samples.npz")[0].astype(float), npz(tmp_path / "bf16/samples.npz")[0].astype(float)
    assert np.abs(a - b).mean() < 8  # bf16 rounding, not other images
    assert json.loads((tmp_path / "bf16/sampling.json").read_text())["bf16"] is True


#################################################################################
#                                  Resume                                       #
#################################################################################


def test_a_run_dying_mid_way_resumes_to_the_same_files(models, reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_write = sample_shards.write_adm_npz
    calls = []

    def dying_write(path, num, pieces):  # shards 0 and 1 complete, shard 2 dies half-written
        calls.append(path)
        if len(calls) == 3:
            next(iter(pieces))
            sample_shards.temp_path(path).write_bytes(b"PK half a zip")
            raise KeyboardInterrupt("killed")
        return real_write(path, num, pieces)

    monkeypatch.setattr("mfrae.sample.write_adm_npz", dying_write)
    assert main(argv(models, out, "--steps", "2")) == 130  # mfrae's one line for an uncaught Ctrl-C
    monkeypatch.undo()
    done = sorted((out / "shards").glob("shard_*.npz"))
    assert len(done) == 2 and not (out / "samples.npz").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}
    damaged = out / "shards/shard_000003.npz"  # a damaged file under a final name is redone too
    damaged.write_bytes(b"PK not a zip")

    assert main(argv(models, out, "--steps", "2")) == 2  # refuses to mix runs without --resume
    assert main([*argv(models, out, "--steps", "3"), "--resume"]) == 2  # and a resume with other settings
    assert main([*argv(models, out, "--steps", "2"), "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # complete shards never rewritten
    assert not list((out / "shards").glob(".*.partial"))
    for name in ("samples.npz", *(f"shards/shard_{k:06d}.npz" for k in range(4))):
        assert digest(out / name) == digest(reference / name), name
    pngs = sorted((out / "images").glob("*.png"))
    assert [digest(p) for p in pngs] == [digest(reference / "images" / p.name) for p in pngs] and len(pngs) == NUM
    assert json.loads((out / "sampling.json").read_text())["generated"] == NUM - 2 * SHARD


def test_a_process_killed_with_sigkill_resumes_to_the_same_file(models, tmp_path):
    extra = ["--num-samples", "400", "--shard-size", "10", "--batch-size", "10", "--no-png"]
    cmd = [sys.executable, "-m", "mfrae", *argv(models, tmp_path / "killed", *extra)]
    victim = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    second = tmp_path / "killed/shards/shard_000001.npz"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None and not second.exists():
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed/samples.npz").exists()
    assert main([*argv(models, tmp_path / "killed", *extra), "--resume"]) == 0
    assert main(argv(models, tmp_path / "full", *extra)) == 0
    assert digest(tmp_path / "killed/samples.npz") == digest(tmp_path / "full/samples.npz")


#################################################################################
#                           torchrun's argument parser                          #
#################################################################################


def _options(command: list[str]) -> list[str]:
    _, sub = build_parser(command)
    return [o for action in sub._actions for o in action.option_strings if o.startswith("--") and o != "--help"]


@pytest.mark.parametrize("command", [["sample"], ["eval"], ["train", "teacher"]])
def test_every_option_passes_through_torchrun_intact(command):
    launcher = get_args_parser()
    aliases = {"--num"}  # single-process spelling of --num-samples; torchrun takes it for --numa-binding
    for option in _options(command):
        script = [*command, option, "1"]
        if option in aliases:
            with pytest.raises(SystemExit):
                launcher.parse_args(["--nproc_per_node", "2", "-m", "mfrae", *script])
            continue
        parsed = launcher.parse_args(["--nproc_per_node", "2", "-m", "mfrae", *script])
        assert parsed.training_script == "mfrae" and parsed.training_script_args == script, option
