"""Duke DME fluid by patient-level 5-fold cross-validation with the pretrained LiteMedSAM base, on the CPU.

Every one of the 10 patients is tested exactly once (``dataset_builder --folds 5``: fold k's patients are its test
split, the next fold validates - early stopping - and the rest train; nothing is chosen on a test fold). Per fold:

- zero-shot LiteMedSAM with one ground-truth box per fluid region (one mask per box, as LiteMedSAM was trained);
- LiteMedSAM + LoRA, automatic mode (no prompts at test time), ``configs/duke_litemedsam.yaml``;
- LiteMedSAM + LoRA, prompted mode (the same ground-truth boxes at test time);
- the MONAI U-Net baseline (same data, splits and loss).

The per-B-scan fluid Dice of the 5 test folds are pooled (110 B-scans, 78 with fluid) and summarised with 95%
percentile bootstrap intervals over the 10 patients. Printed as a Markdown table and written to
``WORK/cv_results.json`` and ``WORK/cv_table.md``; ``benchmarks/DUKE_RESULTS.md`` quotes them.

    python benchmarks/duke_cv.py                   # everything (CPU: see DUKE_RESULTS.md for the wall time)
    python benchmarks/duke_cv.py --folds-to-run 0 1  # some folds; rerun later for the rest, then --stage summary
    python benchmarks/duke_cv.py --config configs/duke_litemedsam_gpu.yaml --epochs 40 --jobs 15 --time-limit 420
        # one GPU: every fold x method trains at once in its own process (LiteMedSAM at 256 px leaves the card
        # mostly idle in one process); --time-limit stops a run that is still going (SIGTERM: the best epoch's
        # adapter so far is what the fold is evaluated with, and timings.json records where it stopped)

A benchmark, not a test. Image embeddings of the frozen encoder are cached on disk (``WORK/embeddings``) and shared by
every fold, mode and the evaluation (exact: the encoder's weights are the base's in every model here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402

RAW = REPO.parent / "shared" / "data" / "duke_dme_fluid"
METHODS = ("zero-shot", "LoRA automatic", "LoRA prompted", "U-Net")


def build_folds(data: Path, folds: int, raw: Path = RAW) -> None:
    if (data / "folds.json").is_file():
        return
    if not (raw / "images").is_dir():
        raise SystemExit(f"Duke DME B-scans not found at {raw}/images; pass --raw FOLDER (images/ and masks/)")
    from dataset_builder.__main__ import main as build_main

    status = build_main([
        "folder", "--images", str(raw / "images"), "--masks", str(raw / "masks"), "--labels", "background,fluid",
        "--patient-regex", r"duke_s(\d+)_", "--disease", "dme", "--output", str(data), "--folds", str(folds),
    ])  # fmt: skip
    if status:
        raise SystemExit(f"building the folds failed ({status})")


def cache_embeddings_everywhere(directory: Path) -> None:
    """Every Segmenter this process builds reuses the on-disk embeddings (all models here share the base's frozen
    encoder: LoRA is only in the mask decoder, so the merged encoder equals the base's)."""
    from octsam import segmenter as seg
    from octsam.training.embedding_cache import enable_embedding_cache

    original = seg.Segmenter.__init__

    def init(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)
        config = self.model.config  # the first of an ensemble; each member's encoder is cached below
        # zero-shot (no LoRA at all) or LoRA only in the mask decoder: the encoder is the base's
        encoder_untouched = all(role == "decoder_attention" for role in config.lora_target_modules)
        if getattr(config, "encoder", None) == "litemedsam" and encoder_untouched:
            for member in getattr(self, "members", [self.model]):
                enable_embedding_cache(member, augmented=False, directory=directory)

    seg.Segmenter.__init__ = init


def train_fold(fold_data: Path, out: Path, mode: str, args, cache: Path) -> None:
    from octsam.cli.train import main as train_main

    if (out / "best_adapter" / "octsam_config.json").is_file():
        return
    common = ["--dataset", str(fold_data), "--output-dir", str(out), "--overwrite-output-dir", "true",
              "--evaluate-test", "false", "--seed", str(args.seed)]  # fmt: skip
    if mode == "unet":
        argv = [*common, "--model", "unet", "--unet-image-size", "256", "--unet-channels", "8", "16", "32", "64",
                "128", "--learning-rate", "0.003", "--num-train-epochs", str(args.unet_epochs),
                "--effective-batch-size", "4", "--per-device-train-batch-size", "4", "--num-workers", "0",
                "--report-to", "none", "--early-stopping-patience", str(args.unet_patience),
                "--keep-checkpoints", "0"]  # fmt: skip
    else:
        argv = ["--config", args.config, *common, "--mode", mode,
                "--num-train-epochs", str(args.epochs), "--embedding-cache-dir", str(cache)]  # fmt: skip
    status = train_main(argv)
    if status:
        raise SystemExit(f"training {out} failed ({status})")


def hardware() -> str:
    """The CPU, and the GPU when one is visible (what the CV ran on)."""
    text = f"{cpu_name()}, {os.cpu_count()} logical CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.get_device_name(0)}; {text}"
    except ImportError:
        pass
    return text


def hardware_by_method(timings: dict) -> str:
    """'HARDWARE: method, method; HARDWARE: ...' from the trainings recorded in timings.json ('' if none says)."""
    names = {"automatic": "LoRA automatic", "prompted": "LoRA prompted", "unet": "U-Net"}
    where: dict[str, list[str]] = {}
    for key, entry in timings.items():
        mode = key.rsplit(" ", 1)[-1]
        if isinstance(entry, dict) and "hardware" in entry and mode in names:
            methods = where.setdefault(entry["hardware"], [])
            if names[mode] not in methods:
                methods.append(names[mode])
    return "; ".join(f"{', '.join(methods)} trained on {hw}" for hw, methods in where.items())


def run_parallel(args, work: Path, folds: list[int]) -> dict:
    """Train every (fold, method) in its own process, ``args.jobs`` at a time, then evaluate every fold the same way.

    Each child is this script with one fold and one method; its log is ``WORK/fold-k/<method>.log``. A child still
    running after ``--time-limit`` seconds gets SIGTERM: training stops like Ctrl-C and the best epoch's adapter so
    far stays (written at every improvement), so the fold is still evaluated; timings.json says it was cut short and
    after how many epochs. Returns the timings of this run.
    """
    import signal
    import subprocess

    script = Path(__file__).resolve()
    base = [sys.executable, str(script), "--work", str(work), "--raw", args.raw, "--folds", str(args.folds), "--config", args.config,
            "--epochs", str(args.epochs), "--unet-epochs", str(args.unet_epochs),
            "--unet-patience", str(args.unet_patience), "--seed", str(args.seed)]  # fmt: skip
    names = {"automatic": "auto", "prompted": "prompted", "unet": "unet"}
    train_jobs = [
        (
            f"fold {k} {mode}",
            [*base, "--stage", "train", "--folds-to-run", str(k), "--train", mode],
            work / f"fold-{k}" / f"{names[mode]}.log",
            work / f"fold-{k}" / names[mode],
        )  # fmt: skip
        for mode in args.train
        for k in folds
    ]
    eval_jobs = [
        (
            f"fold {k} evaluation",
            [*base, "--stage", "evaluate", "--folds-to-run", str(k)],
            work / f"fold-{k}" / "evaluate.log",
            None,
        )  # fmt: skip
        for k in folds
    ]
    timings: dict = {}
    for phase, jobs, limit in (("training", train_jobs, args.time_limit), ("evaluation", eval_jobs, None)):
        log(f"{phase}: {len(jobs)} processes, {args.jobs} at a time")
        pending, running = list(jobs), []
        while pending or running:
            while pending and len(running) < args.jobs:
                name, cmd, log_path, run_dir = pending.pop(0)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(log_path, "w")
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
                running.append((name, proc, handle, log_path, run_dir, time.perf_counter(), False))
            time.sleep(1.0)
            still = []
            for name, proc, handle, log_path, run_dir, t0, stopped in running:
                elapsed = time.perf_counter() - t0
                if proc.poll() is None:
                    if limit and elapsed > limit and not stopped:
                        log(f"{name}: still training after {limit} s, stopping it (the best adapter so far stays)")
                        proc.send_signal(signal.SIGTERM)
                        stopped = True
                    elif stopped and elapsed > limit + 60:
                        proc.kill()
                    still.append((name, proc, handle, log_path, run_dir, t0, stopped))
                    continue
                handle.close()
                text = log_path.read_text(errors="replace")
                entry = {"wall_s": round(elapsed, 1), "exit": proc.returncode, "cut_at_time_limit": stopped}
                entry["hardware"] = hardware()
                if run_dir is not None:
                    entry["epochs"] = text.count("training images/s (")
                    entry["early_stopped"] = "early stopping:" in text
                    entry["best_adapter"] = (run_dir / "best_adapter" / "octsam_config.json").is_file()
                timings[name] = entry
                log(f"{name}: {entry}")
                if proc.returncode and not (stopped and entry.get("best_adapter")):
                    log(f"{name} failed (exit {proc.returncode}); the end of {log_path}:\n" + text[-3000:])
            running = still
    return timings


def evaluate_fold(fold_data: Path, work: Path, out: Path, args) -> None:
    """Evaluate the fold's trained models (and zero-shot) on its test split into ``out``; a model trained after
    ``out`` was written (e.g. the U-Net added later) is evaluated alone into ``out``-<method>."""
    from octsam.evaluation.compare import run_comparison
    from octsam.evaluation.report import _slug

    trained = {"LoRA automatic": "auto", "LoRA prompted": "prompted", "U-Net": "unet"}
    adapters = {
        name: str(work / folder / "best_adapter")
        for name, folder in trained.items()
        if (work / folder / "best_adapter" / "octsam_config.json").is_file()
    }
    zero_shot = "litemedsam"
    if (out / "comparison.json").is_file():
        done = json.loads((out / "comparison.json").read_text()).get("methods", {})
        adapters = {name: path for name, path in adapters.items() if name not in done}
        if not adapters:
            return
        out = out.with_name(out.name + "-" + "-".join(_slug(name) for name in adapters))
        zero_shot = None
    run_comparison(
        str(fold_data),
        adapters=adapters,
        zero_shot_base=zero_shot,
        output_dir=out,
        n_bootstrap=200,
        seed=args.seed,
        overwrite=True,
        verbose=False,
    )


def zero_shot_fold(fold_data: Path, out: Path, args) -> None:
    from octsam.evaluation.compare import run_comparison

    if (out / "comparison.json").is_file():
        return
    run_comparison(str(fold_data), adapters={}, zero_shot_base="litemedsam", output_dir=out, n_bootstrap=200,
                   seed=args.seed, overwrite=True, verbose=False)  # fmt: skip


def summarise(work: Path, folds: int, n_bootstrap: int, seed: int) -> dict:
    """Pool the per-B-scan fluid Dice of the test folds; bootstrap over patients."""
    import numpy as np
    import pandas as pd

    from octsam.evaluation.report import _slug

    rows = []
    for fold in range(folds):
        for method in METHODS:
            # a method's per-image table from the fold's full comparison, from a later one of that method alone
            # (results-<method>: it replaces the first), or (zero-shot) from its own run
            fold_work = work / f"fold-{fold}"
            folders = [
                *sorted(fold_work.glob("results-*"), reverse=True),
                fold_work / "results",
                fold_work / "zero_shot",
            ]
            for folder in folders:
                csv = folder / f"{_slug(method)}_per_image.csv"
                if csv.is_file():
                    table = pd.read_csv(csv)
                    rows.append(table[table["class_name"] == "fluid"].assign(method=method, fold=fold))
                    break
    if not rows:
        raise SystemExit("no fold has results yet")
    data = pd.concat(rows, ignore_index=True)
    rng = np.random.default_rng(seed)
    summary = {"folds_done": {m: sorted(int(f) for f in data[data["method"] == m]["fold"].unique()) for m in METHODS}}
    for method in METHODS:
        part = data[data["method"] == method]
        if part.empty:
            continue
        with_fluid = part[part["area_true_px"] > 0]
        patients = sorted(part["patient_id"].astype(str).unique())
        by_patient = {p: with_fluid[with_fluid["patient_id"].astype(str) == p]["dice"].to_numpy() for p in patients}
        boot = []
        for _ in range(n_bootstrap):
            draw = rng.choice(patients, size=len(patients), replace=True)
            values = np.concatenate([by_patient[p] for p in draw])
            boot.append(np.nanmean(values) if values.size else np.nan)
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        summary[method] = {
            "mean_dice_fluid_bscans": float(np.nanmean(with_fluid["dice"])),
            "median_dice_fluid_bscans": float(np.nanmedian(with_fluid["dice"])),
            "ci95": [float(low), float(high)],
            "n_bscans_with_fluid": int(len(with_fluid)),
            "n_bscans": int(len(part)),
            "n_patients": len(patients),
            "mean_dice_all_scored": float(np.nanmean(part["dice"])),
            "n_scored": int(part["dice"].notna().sum()),
        }
    return summary


def table(summary: dict) -> str:
    lines = [
        "| method | mean per-B-scan fluid Dice [95% CI] | median | B-scans with fluid | patients | folds |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for method in METHODS:
        if method not in summary:
            continue
        s = summary[method]
        lines.append(
            f"| {method} | {s['mean_dice_fluid_bscans']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
            f"{s['median_dice_fluid_bscans']:.3f} | {s['n_bscans_with_fluid']} | {s['n_patients']} | "
            f"{', '.join(map(str, summary['folds_done'][method]))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "outputs" / "duke_cv"))
    parser.add_argument("--raw", default=str(RAW), help="the Duke DME folder (images/, masks/)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--folds-to-run", type=int, nargs="*", default=None, help="default: all")
    parser.add_argument(
        "--stage",
        choices=("all", "zero-shot", "summary", "train", "evaluate"),
        default="all",
        help="zero-shot: only the zero-shot baseline on every fold's test split (minutes once embeddings are cached); "
        "train / evaluate: only that half of 'all' (what --jobs runs in each child)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process (a GPU)")
    parser.add_argument("--time-limit", type=float, default=None, help="with --jobs: seconds per training process")
    parser.add_argument("--config", default=str(REPO / "configs" / "duke_litemedsam.yaml"), help="LoRA runs' config")
    parser.add_argument(
        "--train",
        nargs="+",
        choices=("automatic", "prompted", "unet"),
        default=["automatic", "prompted", "unet"],
        help="what to train per fold (the evaluation takes every trained model of the fold)",
    )
    parser.add_argument("--epochs", type=int, default=25, help="LiteMedSAM + LoRA epochs (early stopping on)")
    parser.add_argument("--unet-epochs", type=int, default=100)
    parser.add_argument(
        "--unet-patience",
        type=int,
        default=0,
        help="U-Net early stopping (0: off, the best validation epoch is kept). The U-Net first sits for 10-25 "
        "epochs on an all-fluid / no-fluid plateau (benchmarks/DUKE_RESULTS.md), which a short patience mistakes for "
        "convergence",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, cache = work / "data", work / "embeddings"
    started = time.perf_counter()
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    folds = args.folds_to_run if args.folds_to_run is not None else list(range(args.folds))
    if args.stage == "all" and args.jobs > 1:
        build_folds(data, args.folds, Path(args.raw))
        timings.update(run_parallel(args, work, folds))
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    elif args.stage in ("all", "train", "evaluate"):
        build_folds(data, args.folds, Path(args.raw))
        cache_embeddings_everywhere(cache)
        for fold in folds:
            fold_data, fold_work = data / f"fold-{fold}", work / f"fold-{fold}"
            t0 = time.perf_counter()
            for mode, folder in (("automatic", "auto"), ("prompted", "prompted"), ("unet", "unet")):
                if mode not in args.train or args.stage == "evaluate":
                    continue
                log(f"fold {fold}: training {mode}")
                t_mode = time.perf_counter()
                if not (fold_work / folder / "best_adapter" / "octsam_config.json").is_file():
                    train_fold(fold_data, fold_work / folder, mode, args, cache)
                    wall = round(time.perf_counter() - t_mode, 1)
                    timings[f"fold {fold} {mode}"] = {"wall_s": wall, "hardware": hardware()}
            if args.stage == "train":
                continue
            log(f"fold {fold}: evaluating")
            evaluate_fold(fold_data, fold_work, fold_work / "results", args)
            if args.stage == "all":
                timings[f"fold {fold}"] = round(time.perf_counter() - t0, 1)
                timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        if args.stage != "all":
            return 0
    if args.stage == "zero-shot":
        build_folds(data, args.folds, Path(args.raw))
        cache_embeddings_everywhere(cache)
        for fold in folds:
            zero_shot_fold(data / f"fold-{fold}", work / f"fold-{fold}" / "zero_shot", args)
    summary = summarise(work, args.folds, args.n_bootstrap, args.seed)
    summary["hardware"] = hardware_by_method(timings) or hardware()
    summary["fold_wall_s"] = timings
    summary["this_run_wall_s"] = round(time.perf_counter() - started, 1)
    (work / "cv_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = table(summary)
    (work / "cv_table.md").write_text(text + "\n")
    print(text)
    print(f"\nfolds per method: {summary['folds_done']}; {summary['hardware']} (times: timings.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
