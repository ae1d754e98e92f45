"""The training engine and the stages, from the command line, on the digits preset at tiny size.

Checked against independent truth: an interrupted-and-resumed run (a real `kill -9`) must log exactly the
losses of an uninterrupted one; two gloo processes must reach the parameters of one process with the same
global batch; bad input must fail before anything is written and lose nothing already written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mfrae.checkpoint import load_model
from mfrae.cli import main
from mfrae.errors import ConfigError
from mfrae.train.config import load_train_config
from mfrae.train.optim import EMA, learning_rate
from mfrae.train.runs import RunDir
from mfrae.train.stages import load_stage_config

TINY = [
    "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}",
    "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}",
    "train.global_batch=8",
    "train.log_every=1",
    "train.ckpt_every=2",
    "train.sample_count=4",
    "train.sample_steps=4",
    "optim.warmup_steps=0",
]
TINY_DECODER = ["model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """decoder -> stats -> teacher -> cmt -> mfd -> mft, a few steps each, all through `mfrae` commands."""
    root = tmp_path_factory.mktemp("digits")
    runs = {name: root / name for name in ("decoder", "stats", "teacher", "cmt", "mfd", "mft")}
    inputs = [f"rae.decoder={runs['decoder']}", f"rae.stats={runs['stats']}", f"teacher={runs['teacher']}"]
    decoder_sets = TINY + TINY_DECODER + ["train.steps=4", "objective.disc_start_step=1", "objective.gan_start_step=2"]
    assert main(["train", "decoder", "--config", "digits", "--out", str(runs["decoder"]), *sets(*decoder_sets)]) == 0
    assert main(["stats", "--config", "digits", "--out", str(runs["stats"]), *sets(TINY[0])]) == 0
    for stage, extra in (
        ("teacher", []),
        ("cmt", ["objective.pairs_per_trajectory=2", "objective.grid_points=4"]),
        ("mfd", [f"model.init={runs['cmt']}"]),
        ("mft", [f"model.init={runs['mfd']}"]),
    ):
        argv = ["train", stage, "--config", "digits", "--out", str(runs[stage]), *sets(*TINY, *inputs, "train.steps=3", *extra)]
        assert main(argv) == 0, stage
    return runs


def test_every_stage_runs_and_writes_its_run_directory(pipeline):
    for stage in ("decoder", "teacher", "cmt", "mfd", "mft"):
        run = pipeline[stage]
        config = (run / "config.yaml").read_text()
        assert f"stage: {stage}" in config
        info = json.loads((run / "run.json").read_text())["launches"][0]
        assert info["torch"] == torch.__version__ and info["command"][1:3] == ["train", stage]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
        ckpt = RunDir(run).latest_checkpoint()
        assert ckpt is not None and {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt"}
        grid = sorted((run / "samples").glob("*.png"))
        assert grid, f"{stage}: no sample grid"
    # MeanFlow stages train a student (interval embedding), the teacher stage a velocity model
    assert load_model(RunDir(pipeline["mfd"]).latest_checkpoint() / "ema.safetensors").is_meanflow
    assert not load_model(RunDir(pipeline["teacher"]).latest_checkpoint() / "ema.safetensors").is_meanflow
    # keep_last=2: with checkpoints every 2 steps the decoder run (4 steps) keeps steps 2 and 4
    assert sorted(p.name for p in (pipeline["decoder"] / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]


def test_decoder_stage_trains_the_discriminator_after_its_start(pipeline):
    records = [json.loads(line) for line in (pipeline["decoder"] / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("disc") for k in records[0])  # step 1 < disc_start_step... logged after the step
    assert any(k.startswith("disc") for k in records[-1])


@pytest.mark.parametrize("stage,steps", [("mfd", 1), ("mfd", 2), ("teacher", 3)])
def test_sampling_writes_images_and_an_adm_npz(pipeline, tmp_path, stage, steps):
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(pipeline[stage]), "--steps", str(steps), "--num", "12", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    assert images.std() > 0  # not a constant image
    assert sorted(np.bincount(labels, minlength=10)) == [1] * 8 + [2] * 2  # "equal": 12 labels over 10 classes
    assert len(list((out / "images").glob("*.png"))) == 12 and (out / "grid.png").is_file()
    report = json.loads((out / "sampling.json").read_text())
    assert report["nfe"] == steps and report["images_per_second"] > 0


def test_resume_after_kill_is_bit_exact(tmp_path, pipeline):
    """A run killed with SIGKILL and resumed logs exactly the losses of an uninterrupted run."""
    steps = 60
    common = sets(*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", f"train.steps={steps}",
                  "train.ckpt_every=5", "train.keep_last=3")
    cmd = [sys.executable, "-m", "mfrae", "train", "teacher", "--config", "digits", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    victim = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if latest.exists() and int(latest.read_text().strip()[len("step_"):]) >= 10:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(losses(tmp_path / "killed"))
    assert 10 <= killed_at < steps

    subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--resume"], check=True, env=env, capture_output=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    full_ema = load_model(tmp_path / "full/checkpoints" / f"step_{steps:08d}" / "ema.safetensors").state_dict()
    resumed_ema = load_model(tmp_path / "killed/checkpoints" / f"step_{steps:08d}" / "ema.safetensors").state_dict()
    assert all(torch.equal(full_ema[k], resumed_ema[k]) for k in full_ema)


#################################################################################
#                    Two gloo processes == one process                          #
#################################################################################


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deterministic_worker(rank: int, world_size: int, port: int, out: str, overrides: list[str]) -> None:
    """One DDP rank: the real engine and teacher stage, with a noise-free regression objective so that the
    result may depend on the global batch only (not on how it is split over processes)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mfrae.train import engine, stages

    def regression(net, x, y, step, part):  # v(x, t = 1/2, y) regressed onto -x: deterministic given the batch
        return (net(x, torch.full((x.shape[0],), 0.5), y) + x).square().flatten(1).mean(1)

    def build(info):  # the real teacher stage with the objective swapped: the engine trains any parts
        parts = stages.build_stage(cfg, info)
        parts.objective = regression
        parts.preview = None
        return parts

    cfg = load_stage_config("teacher", "digits", overrides)
    engine.train(cfg, build, out)


class _DeterministicMeanFlow:
    """The stage's real MeanFlowLoss (its derivative strategy, its target, its weighting) on noise, times and
    r != t rows that are functions of each row's data, so that the result depends on the global batch only."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, net, x, y, step, part):
        from mfrae.flow.objectives import adaptive_weighting, per_sample
        from mfrae.flow.paths import interpolate, one_point_velocity

        noise = x.flip(-1).roll(1, dims=-2)
        m = x.flatten(1).mean(1)
        t = 0.5 + 0.4 * torch.tanh(10 * m)
        r = torch.where(torch.sin(1e3 * m) > 0, 0.5 * t, t)  # about half the rows r != t, chosen by their data
        rows = self.loss.gap_rows(t, r)  # the "random" layout: found in the data
        z = interpolate(x, noise, t)
        u, u_tgt = self.loss.prediction_and_target(net, z, t, r, y, one_point_velocity(x, noise), rows)
        return adaptive_weighting(per_sample((u - u_tgt).square(), "sum"), 1.0, 1e-2)


def _meanflow_worker(rank: int, world_size: int, port: int, out: str, overrides: list[str]) -> None:
    """One DDP rank of the real mfd stage with `_DeterministicMeanFlow` in place of the randomised loss."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mfrae.train import engine, stages

    def build(info):
        parts = stages.build_stage(cfg, info)
        parts.objective = _DeterministicMeanFlow(parts.objective)
        parts.preview = None
        return parts

    cfg = load_stage_config("mfd", "digits", overrides)
    engine.train(cfg, build, out)


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    return load_model(RunDir(run).latest_checkpoint() / "model.safetensors").state_dict()


def test_two_gloo_processes_match_one_process(tmp_path, pipeline):
    # Adam's eps at 1e-3: with the default 1e-8, Adam divides near-zero gradients by their own size, which
    # turns the reduction-order rounding of a split batch (1e-9) into parameter differences of ~1e-5.
    base = [*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", "train.steps=4", "optim.lr=1e-2",
            "optim.eps=1e-3", "train.tensorboard=false"]
    runs = {
        "one": (1, ["train.micro_batch=4"]),  # one process, 2 accumulated micro-batches of 4
        "two": (2, ["train.micro_batch=4"]),  # two processes, one micro-batch of 4 each
        "two_accum": (2, ["train.micro_batch=2"]),  # two processes, 2 accumulated micro-batches of 2 each
    }
    for name, (world, extra) in runs.items():
        torch.multiprocessing.spawn(_deterministic_worker, args=(world, _free_port(), str(tmp_path / name), base + extra),
                                    nprocs=world, join=True)
    one = _final_params(tmp_path / "one")
    initial = load_train_config("teacher", "digits", base)  # sanity: training moved the weights
    assert initial.train.steps == 4
    for name in ("two", "two_accum"):
        other = _final_params(tmp_path / name)
        for key, value in one.items():
            assert torch.allclose(value, other[key], atol=1e-5, rtol=1e-4), f"{name}: {key} differs"


@pytest.mark.parametrize("derivative", [pytest.param("jvp", marks=pytest.mark.slow), "finite_difference"])
def test_meanflow_derivatives_under_two_gloo_processes_match_one_process(tmp_path, pipeline, derivative):
    # The JVP runs on the network inside DDP (torch.func.jvp cannot go through DDP's forward); DDP reduces the
    # gradients of the one autograd forward. Same global batch of 8 either way: 2 x 4 or 2 processes x 2 x 2.
    base = [*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", f"model.init={pipeline['cmt']}",
            f"teacher={pipeline['teacher']}", "objective.label_dropout=0", f"objective.derivative={derivative}",
            "train.steps=3", "optim.lr=1e-2", "optim.eps=1e-3", "train.tensorboard=false", "eval.every=0"]
    for name, world, micro in (("one", 1, 4), ("two", 2, 2)):
        torch.multiprocessing.spawn(_meanflow_worker, args=(world, _free_port(), str(tmp_path / name),
                                                             base + [f"train.micro_batch={micro}"]), nprocs=world, join=True)
    one, two = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
    start = load_model(RunDir(pipeline["cmt"]).latest_checkpoint() / "ema.safetensors").state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if k in start)
    assert moved > 1e-3  # it trained
    for key, value in one.items():
        assert torch.allclose(value, two[key], atol=1e-5, rtol=1e-4), f"{derivative}: {key} differs"


@pytest.mark.slow
def test_torchrun_two_processes_exit_cleanly_every_time(tmp_path, pipeline):
    # A rank that tears its process group down while rank 0 still writes a checkpoint aborted in gloo's teardown
    # ("terminate called without an active exception") in a few percent of runs; 50 in a row must all exit 0.
    base = [*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", "train.steps=2", "train.micro_batch=4",
            "train.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(50):
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "-m", "mfrae", "train", "teacher", "--config", "digits", "--out", str(out), *sets(*base)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, f"attempt {attempt}: exit {done.returncode}\n{done.stderr[-3000:]}"
        assert RunDir(out).latest_checkpoint().name == "step_00000002"


#################################################################################
#                        Failure handling and bad input                         #
#################################################################################


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, pipeline, capsys):
    run = tmp_path / "run"
    argv = ["train", "teacher", "--config", "digits", "--out", str(run),
            *sets(*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", "train.steps=2")]
    assert main(argv) == 0
    good = RunDir(run).latest_checkpoint()
    before = (good / "model.safetensors").read_bytes()
    # continue with a gradient-norm limit no step can meet: the run must stop at step 3 and say why
    assert main([*argv[:-2], *sets("train.steps=6", "train.max_grad_norm=1e-12"), "--resume"]) == 3
    err = capsys.readouterr().err
    assert "diverged at step 3" in err and "gradient norm" in err and str(good) in err
    assert RunDir(run).latest_checkpoint() == good and (good / "model.safetensors").read_bytes() == before


def test_bad_configs_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    for override, message in (
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("model.options={depthh: 3}", "unknown config key 'model.options.depthh'"),
        ("objective.fd_stepp=0.1", "unknown config key 'objective.fd_stepp'"),
    ):
        argv = ["train", "mfd", "--config", "digits", "--out", str(out), "--set", override,
                "--set", "rae.stats=missing", "--set", "teacher=missing"]
        assert main(argv) == 2, override
        assert message in capsys.readouterr().err, override
    assert not out.exists()
    with pytest.raises(ConfigError, match="stage cmt distils a teacher"):
        load_train_config("cmt", "digits", ["teacher=null"])
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'"):
        load_train_config("teacher", "nope")


def test_missing_inputs_and_existing_runs_give_clear_errors(tmp_path, pipeline, capsys):
    argv = ["train", "mfd", "--config", "digits", "--out", str(tmp_path / "r"),
            *sets(*TINY, f"rae.stats={pipeline['stats']}", "rae.decoder=null", f"teacher={tmp_path / 'no-teacher'}")]
    assert main(argv) == 2
    assert f"no such file or run directory: {tmp_path / 'no-teacher'}" in capsys.readouterr().err
    # a finished run is never overwritten by accident
    before = (pipeline["teacher"] / "metrics.jsonl").read_text()
    assert main(["train", "teacher", "--config", "digits", "--out", str(pipeline["teacher"])]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (pipeline["teacher"] / "metrics.jsonl").read_text() == before


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, pipeline):
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = tmp_path / "run"
    argv = ["train", "teacher", "--config", "digits", "--out", str(run),
            *sets(*TINY, "data.kind=folder", f"data.options={{root: {root}, image_size: 32}}",
                  f"rae.stats={pipeline['stats']}", "rae.decoder=null", "train.steps=3")]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_images"] == 1
    # ... or fail the run when asked, naming the file
    assert main([*argv[:5], str(tmp_path / "strict"), *argv[6:], "--set", "train.fail_on_bad_images=true"]) != 0


#################################################################################
#                          Small pieces, closed form                            #
#################################################################################


def test_learning_rate_schedules():
    cfg = load_train_config("teacher", "digits", ["optim.lr=1.0", "optim.warmup_steps=10", "optim.schedule=linear",
                                                  "optim.decay_start=20", "optim.decay_end=40", "optim.final_lr=0.5"]).optim
    assert [learning_rate(cfg, s, 100) for s in (0, 9, 15, 20, 30, 40, 99)] == [0.1, 1.0, 1.0, 1.0, 0.75, 0.5, 0.5]
    cfg.schedule = "cosine"
    assert learning_rate(cfg, 30, 100) == pytest.approx(0.75) and learning_rate(cfg, 40, 100) == pytest.approx(0.5)


def test_ema_matches_closed_form():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(3):
        ema.update(0.9)
    # p_ema after 3 updates toward a constant 1: 1 + 0.9^3 (start - 1)
    assert torch.allclose(ema.model.weight, 1 + 0.9**3 * (start - 1), atol=1e-6)


def test_training_from_a_latent_cache(tmp_path, pipeline):
    encoder = TINY[0]
    assert main(["cache", "--config", "digits", "--out", str(tmp_path / "cache"), "--shard-size", "600", *sets(encoder)]) == 0
    run = tmp_path / "run"
    argv = ["train", "teacher", "--config", "digits", "--out", str(run),
            *sets(*TINY, "data.kind=latents", f"data.options={{cache_dir: {tmp_path / 'cache'}}}",
                  f"rae.stats={pipeline['stats']}", "rae.decoder=null", "train.steps=2")]
    assert main(argv) == 0
    assert len(losses(run)) == 2
    # a cache made by another encoder is refused
    other = [a.replace("depth: 1", "depth: 2") for a in argv]
    assert main([*other[:5], str(tmp_path / "other"), *other[6:]]) == 2


def test_evaluation_during_training_logs_fd_and_leaves_training_untouched(tmp_path, pipeline):
    """With `eval.every` on, the run logs the FD of its EMA samples at those steps, and every loss it logs is
    the loss of the same run without evaluation (evaluation draws nothing from the training RNG)."""
    from mfrae.data import DigitsDataset
    from mfrae.eval.samples import save_adm_npz, to_uint8_nhwc

    test = DigitsDataset(split="test", image_size=32)
    reference = save_adm_npz(tmp_path / "reference.npz", to_uint8_nhwc(torch.stack([test[i][0] for i in range(64)])))
    inputs = [f"rae.decoder={pipeline['decoder']}", f"rae.stats={pipeline['stats']}", f"teacher={pipeline['teacher']}"]
    evaluation = ["eval.every=2", "eval.num_samples=24", "eval.batch_size=10", "eval.steps=[1, 2]",
                  "eval.features=pixels", "eval.feature_options={pixels_size: 2}", f"eval.reference={reference}"]
    for stage, extra, keys in (("teacher", ["eval.teacher_steps=[3]"], ["eval/fd_3nfe"]),
                               ("mfd", [f"model.init={pipeline['cmt']}"], ["eval/fd_1step", "eval/fd_2step"])):
        run = tmp_path / stage
        argv = ["train", stage, "--config", "digits", "--out", str(run),
                *sets(*TINY, *inputs, "train.steps=3", *extra, *evaluation)]
        assert main(argv) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if keys[0] in r] == [2, 3]  # every 2 steps, and at the end
        assert all(np.isfinite(r[k]) and r[k] >= 0 for r in records for k in keys if k in r)
        assert losses(run) == losses(pipeline[stage]), stage
