"""Write a Hub-ready model folder (safetensors, config, model card) from a run or checkpoint.

    mfrae export --ckpt RUN_OR_CKPT --out DIR [--repo-id OWNER/NAME]
    hf upload OWNER/NAME DIR            # then: mfrae sample --ckpt OWNER/NAME --steps 1 --out samples

A teacher or MeanFlow run (its run directory, or a checkpoint folder inside it) gives

    DIR/model.safetensors       the EMA network, an mfrae model file (kind and config in its metadata)
    DIR/config.json             {"library": "mfrae", "kind": "meanflow"|"teacher", "weights", "rae": "rae", "shift", ...}
    DIR/training_config.yaml    the run's resolved config.yaml, as trained (paths in it are the training machine's)
    DIR/training_run.json       the run's run.json (commands, versions, git revision)
    DIR/README.md               the model card: the Hub's YAML header, training, metrics with NFE, loading lines
    DIR/samples.png             the run's sample grid of the exported step (or its latest)
    DIR/rae/                    an RAE folder (below): the decoder and statistics the run sampled with

and a decoder run gives an RAE folder:

    DIR/config.json             {"library": "mfrae", "kind": "rae", "decoder", "stats", "encoder": {name, options, file}}
    DIR/decoder.safetensors     the ViT decoder (a released `model.pt` is converted)
    DIR/stats.safetensors       the latent statistics (when the run's rae.stats exists, or --stats)
    DIR/encoder.safetensors     the small ViT encoder's weights, when the run's encoder was read from a file

Everything sampling needs is inside the folder, so `mfrae sample --ckpt DIR` and the loaders of
`mfrae.checkpoint` read it with no run directory. A DINOv2 encoder is named, not copied: decoding needs only
its pixel normalisation. Metrics in the card come from the run's metrics.jsonl (the `eval/*` records of the
last evaluation) and, when it exists, the demo's report.json beside the run directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from mfrae.checkpoint import FOLDER_CONFIG, FOLDER_LIBRARY, load_latent_stats, load_model, load_vit_decoder, save_latent_stats, save_model
from mfrae.fileio import atomic_write_text
from mfrae.train.runs import CHECKPOINTS, RunDir, resolve_weights

LICENSE_DEFAULT = "cc-by-nc-4.0"  # the authors' RAE and MF-RAE releases are non-commercial; say otherwise with --license
DATASETS = {"digits": "sklearn-digits", "folder": None, "latents": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory, or a checkpoint folder inside one")
    parser.add_argument("--out", required=True, help="the model folder to write (new or empty)")
    parser.add_argument("--repo-id", default=None, help="the Hub repository the folder is meant for (model card)")
    parser.add_argument("--decoder", help="RAE decoder (default: the run's rae.decoder)")
    parser.add_argument("--stats", help="latent statistics (default: the run's rae.stats)")
    parser.add_argument("--license", default=LICENSE_DEFAULT, help=f"license of the model card (default {LICENSE_DEFAULT})")
    parser.add_argument("--dataset", default=None, help="the Hub dataset id the model was trained on (model card)")


#################################################################################
#                              Reading the run                                  #
#################################################################################


def find_run(ckpt: str) -> tuple[RunDir, Path]:
    """(run directory, checkpoint folder) of a run directory or of a checkpoint folder inside one."""
    path = Path(ckpt)
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {ckpt}: not a run directory or checkpoint folder (export reads the run's "
                                "config.yaml, so a bare weights file is not enough)")
    if (path / CHECKPOINTS).is_dir():
        run = RunDir(path)
        step = run.latest_checkpoint()
        if step is None:
            raise FileNotFoundError(f"{ckpt}: run directory without a complete checkpoint")
        return run, step
    run = RunDir(path.parent.parent)
    if path.parent.name != CHECKPOINTS or not run.config_file.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: neither a run directory nor a checkpoint folder of one")
    return run, path


def last_eval(run: RunDir) -> tuple[int | None, dict[str, float]]:
    """(step, {key: value}) of the last metrics.jsonl record holding `eval/*` values ((None, {}) when none)."""
    if not run.metrics.is_file():
        return None, {}
    found: tuple[int | None, dict] = (None, {})
    for line in run.metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        values = {k: v for k, v in record.items() if k.startswith("eval/")}
        if values:
            found = (record.get("step"), values)
    return found


def demo_metrics(run: RunDir, stage: str) -> list[dict]:
    """The `quality_vs_nfe` rows of the demo's report.json beside the run for this stage (model `stage` or
    `stage_Nstep`), [] without one."""
    report = run.root.parent / "report.json"
    if not report.is_file():
        return []
    try:
        rows = json.loads(report.read_text()).get("quality_vs_nfe", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, dict) and str(r.get("model", "")).split("_")[0] == stage]


def sample_grid(run: RunDir, step: Path) -> Path | None:
    """The run's sample grid of the exported step, else its latest one."""
    exact = run.samples / f"{step.name}.png"
    if exact.is_file():
        return exact
    grids = sorted(run.samples.glob("step_*.png"))
    return grids[-1] if grids else None


#################################################################################
#                              Writing the folder                              #
#################################################################################


def write_rae_folder(out: Path, rae: dict, decoder: str, stats: str | None) -> dict:
    """decoder.safetensors, stats.safetensors, the encoder file when there is one, and config.json."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(load_vit_decoder(resolve_weights(decoder)), out / "decoder.safetensors")
    config = {"library": FOLDER_LIBRARY, "kind": "rae", "decoder": "decoder.safetensors", "stats": None}
    if stats:
        save_latent_stats(load_latent_stats(resolve_weights(stats)), out / "stats.safetensors")
        config["stats"] = "stats.safetensors"
    encoder = json.loads(json.dumps(rae.get("encoder") or {}))
    options = encoder.setdefault("options", {})
    if options.get("path") and Path(str(options["path"])).is_file():  # small_vit weights: they travel along
        shutil.copyfile(options.pop("path"), out / "encoder.safetensors")
        encoder["file"] = "encoder.safetensors"
    config["encoder"] = encoder
    config["noise_tau"] = rae.get("noise_tau")
    atomic_write_text(out / FOLDER_CONFIG, json.dumps(config, indent=2))
    return config


def _rae_specs(args: argparse.Namespace, rae: dict) -> tuple[str, str | None]:
    decoder = args.decoder or rae.get("decoder")
    if not decoder:
        raise ValueError("no RAE decoder: the run's config names no rae.decoder; pass --decoder")
    stats = args.stats or rae.get("stats")
    if stats and not args.stats and not Path(str(stats)).exists() and not str(stats).startswith("hf://"):
        stats = None  # a decoder run trained before its statistics existed
    return str(decoder), str(stats) if stats else None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; choose a new one")
    run_dir, step = find_run(args.ckpt)
    config = run_dir.saved_config() or {}
    stage = config.get("stage")
    rae = config.get("rae") or {}
    decoder, stats = _rae_specs(args, rae) if stage != "decoder" else (str(step / "ema.safetensors"), args.stats or rae.get("stats"))
    if stage == "decoder" and stats and not args.stats and not Path(str(stats)).exists():
        stats = None
    out.mkdir(parents=True, exist_ok=True)
    if stage == "decoder":
        write_rae_folder(out, rae, decoder, stats)
        kind, model = "rae", load_vit_decoder(out / "decoder.safetensors")
    else:
        model = load_model(step / "ema.safetensors")
        kind = "meanflow" if model.is_meanflow else "teacher"
        save_model(model, out / "model.safetensors")
        write_rae_folder(out / "rae", rae, decoder, stats)
        manifest = {"library": FOLDER_LIBRARY, "kind": kind, "weights": "model.safetensors", "rae": "rae",
                  "stage": stage, "shift": (config.get("objective") or {}).get("shift"),
                  "model": model.config.to_dict(), "step": int(step.name.split("_")[1])}
        atomic_write_text(out / FOLDER_CONFIG, json.dumps(manifest, indent=2))
    shutil.copyfile(run_dir.config_file, out / "training_config.yaml")
    if run_dir.info_file.is_file():
        shutil.copyfile(run_dir.info_file, out / "training_run.json")
    grid = sample_grid(run_dir, step)
    if grid is not None:
        shutil.copyfile(grid, out / "samples.png")
    card = model_card(args, config, kind, model, step, grid is not None, last_eval(run_dir), demo_metrics(run_dir, stage))
    atomic_write_text(out / "README.md", card)
    repo = args.repo_id or f"OWNER/{out.name}"
    print(f"wrote the {kind} model folder {out}; upload it with: hf upload {repo} {out}")
    return 0


#################################################################################
#                                 Model card                                    #
#################################################################################


def card_header(args: argparse.Namespace, config: dict, kind: str) -> dict:
    """The YAML header of the Hub's model card spec (library, tags, license, datasets, pipeline)."""
    dataset = args.dataset or DATASETS.get((config.get("data") or {}).get("kind"))
    header = {
        "library_name": "mfrae",
        "license": args.license,
        "tags": ["mfrae", "meanflow" if kind == "meanflow" else "flow-matching" if kind == "teacher" else "autoencoder",
                 "representation-autoencoder", "image-generation", f"stage-{config.get('stage')}"],
        "pipeline_tag": "unconditional-image-generation",
    }
    if dataset:
        header["datasets"] = [dataset]
    return header


def _metrics_table(evaluated: tuple[int | None, dict], demo: list[dict]) -> list[str]:
    lines = []
    step, values = evaluated
    if values:
        lines += [f"Measured during training (`eval` section, step {step}; FD under the run's feature extractor "
                  "against its reference):", "", "| metric | NFE | value |", "|---|---|---|"]
        for key, value in values.items():
            suffix = key.rsplit("_", 1)[-1]
            nfe = suffix[:-4] if suffix.endswith("step") else suffix[:-3] if suffix.endswith("nfe") else ""
            lines.append(f"| `{key}` | {nfe} | {value:.4g} |")
        lines.append("")
    if demo:
        lines += ["From the `mfrae demo` report beside the run (`report.json`):", "",
                  "| model | NFE | FD | class accuracy |", "|---|---|---|---|"]
        for row in demo:
            acc = row.get("class_accuracy")
            lines.append(f"| {row.get('model')} | {row.get('nfe')} | {row.get('fd', float('nan')):.4g} | "
                         f"{'' if acc is None else f'{acc:.3f}'} |")
        lines.append("")
    return lines or ["No metrics were measured for this run (its `eval` section was off and no demo report lies "
                     "beside it).", ""]


def model_card(args: argparse.Namespace, config: dict, kind: str, model, step: Path, has_grid: bool,
               evaluated: tuple[int | None, dict], demo: list[dict]) -> str:
    """README.md: the YAML header, then how the model was trained, its metrics with NFE, a grid, loading lines."""
    repo = args.repo_id or f"OWNER/{Path(args.out).name}"
    train, optim = config.get("train") or {}, config.get("optim") or {}
    data, rae = config.get("data") or {}, config.get("rae") or {}
    params = sum(p.numel() for p in model.parameters())
    what = {"meanflow": "a MeanFlow student (one- or few-step generator)", "teacher": "a flow-matching teacher "
            "(sampled with an ODE solver)", "rae": "the decoder of a Representation Autoencoder"}[kind]
    lines = ["---", yaml.safe_dump(card_header(args, config, kind), sort_keys=False).strip(), "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"An mfrae model folder: {what}, stage `{config.get('stage')}` of MF-RAE "
             "(arXiv 2511.13019), {:,} parameters, exported from checkpoint `{}`.".format(params, step.name), "",
             "## Training", "",
             f"- data: `{data.get('kind')}` {json.dumps(data.get('options') or {})}",
             f"- RAE encoder: `{(rae.get('encoder') or {}).get('name')}`",
             f"- steps: {train.get('steps')}, global batch {train.get('global_batch')}, EMA decay "
             f"{train.get('ema_decay')}, precision {train.get('precision')}",
             f"- optimizer: AdamW, lr {optim.get('lr')}, schedule {optim.get('schedule')}, warm-up "
             f"{optim.get('warmup_steps')} steps",
             f"- objective: `{json.dumps(config.get('objective') or {})}`",
             "- the full resolved config is `training_config.yaml`; commands, versions and git revision are in "
             "`training_run.json`", "", "## Metrics", ""]
    lines += _metrics_table(evaluated, demo)
    if has_grid:
        nfe = "1 step" if kind == "meanflow" else f"{train.get('sample_steps') or 50} ODE steps" if kind == "teacher" else "reconstructions"
        lines += ["## Samples", "", f"![samples](samples.png) (the run's preview grid from fixed noise, {nfe})", ""]
    lines += ["## Use", ""]
    if kind == "rae":
        lines += ["```bash", f"mfrae sample --ckpt MODEL_FOLDER --decoder hf://{repo} --stats hf://{repo} --out samples",
                  "```", "", "```python", "from mfrae.checkpoint import load_vit_decoder",
                  f'decoder = load_vit_decoder("hf://{repo}")', "```", ""]
    else:
        steps = "--steps 1" if kind == "meanflow" else "--steps 49"
        lines += ["```bash", f"mfrae sample --ckpt {repo} {steps} --num-samples 64 --out samples", "```", "",
                  "```python", "from mfrae.checkpoint import load_dit_dh",
                  f'model = load_dit_dh("hf://{repo}")', "```", "",
                  "The folder carries its RAE (`rae/`: decoder, latent statistics and the encoder's name), so "
                  "sampling needs nothing else.", ""]
    return "\n".join(lines)
