"""Duke DME fluid, patient-level 5-fold CV, native resolution: the CPU recipe against zero-shot, with raw output.

Per fold (``dataset_builder --folds 5``: fold k's patients test, the next fold validates for early stopping, the rest
train; nothing is chosen on a test fold):

- ``zero-shot (shrunk)``: LiteMedSAM, one ground-truth box per fluid region, the whole B-scan shrunk into 256 px;
- ``zero-shot native``: the same boxes, each decoded in a 256 px window around it at the B-scan's own pixel size;
- ``LoRA automatic native``: ``configs/duke_native_cpu.yaml`` (frozen encoder, native tiles, decoder LoRA), no
  prompts at test time, sliding window with Gaussian blending;
- with ``--train``: also LoRA prompted (the same boxes at test time), the shrunk-input versions of both, and the
  DynUNet baseline (nnU-Net 2D-like, deep supervision, the same native crops and sliding window);
- with ``--tta``: the automatic models again with flip test-time augmentation (a second encoding of every tile).

A fold ensemble is not a CV method (the other folds' models were trained on this fold's test patients); it is for
new data (``inference.py --adapter A --adapter B ...``).

Every run writes under ``--results`` (committed): ``env.json`` (CPU/GPU, library versions, git commit, command),
the config, per fold ``train.log`` / ``evaluate.log`` / the adapter's ``octsam_config.json`` and ``all_results.json`` /
per-method per-B-scan CSVs, and at the end ``cv_results.json`` and ``cv_table.md``: the test folds' per-B-scan fluid
Dice pooled (78 B-scans with fluid), 95 % bootstrap intervals over the 10 patients, and paired patient-bootstrap
intervals of the differences. Checkpoints, datasets and the embedding cache stay in ``--work`` (not committed).

    python benchmarks/duke_native_cv.py                        # all 5 folds (CPU, 2 cores: see the run's env.json)
    python benchmarks/duke_native_cv.py --folds-to-run 0 --epochs 2   # a dry run
    python benchmarks/duke_native_cv.py --stage summary        # tables from the committed CSVs only
    bash benchmarks/gpu_native_duke.sh                         # one H100: every method, 10 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import environment, log  # noqa: E402
from benchmarks.duke_cv import RAW, build_folds, cache_embeddings_everywhere  # noqa: E402

# what can be trained per fold: name -> (folder, method name in the tables, train.py arguments after --config)
TRAININGS = {
    "automatic": ("auto", "LoRA automatic native", ["--mode", "automatic"]),
    "prompted": ("prompted", "LoRA prompted native", ["--mode", "prompted"]),
    "automatic-shrunk": ("auto_shrunk", "LoRA automatic (shrunk)", ["--mode", "automatic", "--input-mode", "resize"]),
    "prompted-shrunk": ("prompted_shrunk", "LoRA prompted (shrunk)", ["--mode", "prompted", "--input-mode", "resize"]),
    "dynunet": (
        "dynunet",
        "DynUNet native",
        ["--model", "dynunet", "--unet-image-size", "256", "--unet-channels", "32", "64", "128", "256", "512", "512"],
    ),  # fmt: skip
}
ZERO_SHOT = ("zero-shot (shrunk)", "zero-shot native")
TTA_SUFFIX = " + flip TTA"
METHODS = (
    *ZERO_SHOT,
    *(name for _, name, _ in TRAININGS.values()),
    *(name + TTA_SUFFIX for key, (_, name, _) in TRAININGS.items() if key in ("automatic", "dynunet")),
)
# (method, baseline): the paired differences reported where both were run
DIFFERENCES = (
    ("LoRA automatic native", "zero-shot (shrunk)"),
    ("LoRA automatic native", "zero-shot native"),
    ("zero-shot native", "zero-shot (shrunk)"),
    ("LoRA automatic native", "LoRA automatic (shrunk)"),
    ("LoRA automatic native", "DynUNet native"),
    ("LoRA automatic native + flip TTA", "LoRA automatic native"),
    ("LoRA automatic native + flip TTA", "DynUNet native + flip TTA"),
    ("LoRA prompted native", "zero-shot native"),
    ("LoRA prompted native", "LoRA prompted (shrunk)"),
)


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int, time_limit: float | None) -> dict:
    """Run (name, command, log) jobs, ``parallel`` at a time, each logging to its file; returns wall times. A job
    past ``time_limit`` seconds gets SIGTERM: training stops like Ctrl-C and keeps its best adapter so far."""
    import signal

    pending, running, walls = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log_path = pending.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "w")
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            running.append([name, proc, handle, log_path, time.perf_counter(), False])
        time.sleep(0.5)
        for job in list(running):
            name, proc, handle, log_path, t0, stopped = job
            elapsed = time.perf_counter() - t0
            if proc.poll() is None:
                if time_limit and elapsed > time_limit and not stopped:
                    log(f"{name}: past {time_limit:.0f} s, stopping it (its best adapter so far stays)")
                    proc.send_signal(signal.SIGTERM)
                    job[5] = True
                continue
            handle.close()
            running.remove(job)
            walls[name] = {"wall_s": round(elapsed, 1), "exit": proc.returncode, "stopped_at_time_limit": stopped}
            log(f"{name}: exit {proc.returncode} after {elapsed:.0f} s ({log_path})")
    return walls


def train_jobs(fold: int, args, work: Path, results: Path) -> list[tuple[str, list[str], Path]]:
    jobs = []
    for key in args.train:
        folder, _, extra = TRAININGS[key]
        out = work / f"fold-{fold}" / folder
        if (out / "best_adapter" / "octsam_config.json").is_file():
            continue
        cmd = [sys.executable, "-m", "octsam.cli.train", "--config", args.config, *extra,
               "--dataset", str(work / "data" / f"fold-{fold}"), "--output-dir", str(out),
               "--overwrite-output-dir", "true", "--evaluate-test", "false",
               "--embedding-cache-dir", str(work / "embeddings"), "--num-train-epochs", str(args.epochs),
               "--seed", str(args.seed)]  # fmt: skip
        jobs.append((f"fold {fold} {key}", cmd, results / f"fold-{fold}" / f"train_{folder}.log"))
    return jobs


def keep_training_records(fold: int, args, work: Path, results: Path) -> None:
    for key in args.train:
        folder = TRAININGS[key][0]
        out = work / f"fold-{fold}" / folder
        for name in ("best_adapter/octsam_config.json", "all_results.json"):
            if (out / name).is_file():
                shutil.copy(out / name, results / f"fold-{fold}" / f"{folder}_{Path(name).name}")


def evaluate(fold: int, args, work: Path, results: Path) -> None:
    """(In a child process) every method on the fold's test split; per-method tables into results/fold-k/eval."""
    from octsam.data.dataset import load_oct_dataset
    from octsam.evaluation.predict import evaluate_segmenter, evaluate_zero_shot
    from octsam.evaluation.report import write_results
    from octsam.segmenter import Segmenter

    cache_embeddings_everywhere(work / "embeddings")
    dataset, labels = load_oct_dataset(str(work / "data" / f"fold-{fold}"))
    split = dataset["test"]
    out = results / f"fold-{fold}" / "eval"
    out.mkdir(parents=True, exist_ok=True)
    common = dict(n_bootstrap=200, seed=args.seed)
    device = "auto"
    methods = [m for m in ZERO_SHOT if m in args.zero_shot]
    for key in args.train:
        folder, name, _ = TRAININGS[key]
        methods.append((name, folder, "none"))
        if args.tta and key in ("automatic", "dynunet"):
            methods.append((name + TTA_SUFFIX, folder, "flip"))
    for method in methods:
        start = time.perf_counter()
        if isinstance(method, str):
            mode = "native" if "native" in method else "resize"
            result = evaluate_zero_shot("litemedsam", split, labels, None, device=device, input_mode=mode, **common)
        else:
            method, folder, tta = method
            adapter = work / f"fold-{fold}" / folder / "best_adapter"
            segmenter = Segmenter.from_pretrained(adapter, device=device, tta=tta)
            prompted = segmenter.config.mode == "prompted"
            result = evaluate_segmenter(segmenter, split, labels, None, method, prompted=prompted, **common)
        write_results(result, out, method)
        log(
            f"fold {fold} {method}: mean Dice {result.headline['mean_dice']:.3f} ({time.perf_counter() - start:.0f} s)"
        )


def per_image_table(results: Path, folds: list[int]):
    import pandas as pd

    from octsam.evaluation.report import _slug

    rows = []
    for fold in folds:
        for method in METHODS:
            csv = results / f"fold-{fold}" / "eval" / f"{_slug(method)}_per_image.csv"
            if csv.is_file():
                table = pd.read_csv(csv)
                rows.append(table[table["class_name"] == "fluid"].assign(method=method, fold=fold))
    if not rows:
        raise SystemExit(f"no per-image results under {results}")
    return pd.concat(rows, ignore_index=True)


def summarise(results: Path, folds: list[int], n_bootstrap: int, seed: int) -> dict:
    """Pooled per-B-scan fluid Dice over B-scans with fluid; bootstrap over patients (and paired differences)."""
    import numpy as np

    data = per_image_table(results, folds)
    data = data[data["area_true_px"] > 0]
    data["patient_id"] = data["patient_id"].astype(str)
    patients = sorted(data["patient_id"].unique())
    rng = np.random.default_rng(seed)
    draws = [rng.choice(patients, size=len(patients), replace=True) for _ in range(n_bootstrap)]
    by = {m: data[data["method"] == m].set_index("scan_id")["dice"] for m in METHODS if (data["method"] == m).any()}
    patient_of = data.drop_duplicates("scan_id").set_index("scan_id")["patient_id"]

    def boot(values):
        groups = {p: values[patient_of[values.index] == p].to_numpy() for p in patients}
        means = [np.nanmean(np.concatenate([groups[p] for p in d])) for d in draws]
        return [float(v) for v in np.nanpercentile(means, [2.5, 97.5])]

    summary: dict = {"methods": {}, "differences": {}}
    for method, values in by.items():
        summary["methods"][method] = {
            "mean_dice_fluid_bscans": float(values.mean()),
            "median_dice_fluid_bscans": float(values.median()),
            "ci95": boot(values),
            "n_bscans_with_fluid": int(len(values)),
            "n_patients": int(patient_of[values.index].nunique()),
            "folds": sorted(int(f) for f in data[data["method"] == method]["fold"].unique()),
        }
    for method, baseline in DIFFERENCES:
        if method in by and baseline in by:
            common = by[method].index.intersection(by[baseline].index)
            diff = by[method][common] - by[baseline][common]
            summary["differences"][f"{method} - {baseline}"] = {
                "mean": float(diff.mean()), "ci95": boot(diff), "n_bscans": int(len(common)),
            }  # fmt: skip
    return summary


def table(summary: dict) -> str:
    lines = [
        "| method | mean per-B-scan fluid Dice [95% CI] | median | B-scans with fluid | patients | folds |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for method, s in summary["methods"].items():
        lines.append(
            f"| {method} | {s['mean_dice_fluid_bscans']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
            f"{s['median_dice_fluid_bscans']:.3f} | {s['n_bscans_with_fluid']} | {s['n_patients']} | "
            f"{', '.join(map(str, s['folds']))} |"
        )
    if summary["differences"]:
        lines += ["", "| paired difference (same B-scans) | mean [95% CI, patient bootstrap] | B-scans |",
                  "| --- | --- | ---: |"]  # fmt: skip
        for name, d in summary["differences"].items():
            lines.append(f"| {name} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['n_bscans']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", default=str(REPO / "outputs" / "duke_native_cv"), help="datasets, checkpoints, cache"
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "duke_native_cpu"))
    parser.add_argument("--raw", default=str(RAW), help="the Duke DME folder (images/, masks/)")
    parser.add_argument("--config", default=str(REPO / "configs" / "duke_native_cpu.yaml"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--folds-to-run", type=int, nargs="*", default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--train", nargs="*", default=["automatic"], choices=list(TRAININGS))
    parser.add_argument("--zero-shot", nargs="*", default=list(ZERO_SHOT), choices=ZERO_SHOT)
    parser.add_argument("--tta", action="store_true", help="also evaluate automatic models with flip TTA")
    parser.add_argument("--jobs", type=int, default=1, help="trainings / evaluations at once (a GPU)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per training process at most")
    parser.add_argument("--stage", choices=("all", "evaluate", "summary"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, results = Path(args.work), Path(args.results)
    folds = args.folds_to_run if args.folds_to_run is not None else list(range(args.folds))
    if args.stage == "evaluate":  # a child: one fold's evaluation
        for fold in folds:
            evaluate(fold, args, work, results)
        return 0
    if args.stage == "all":
        results.mkdir(parents=True, exist_ok=True)
        (results / "env.json").write_text(json.dumps(environment([sys.executable, *sys.argv]), indent=2) + "\n")
        shutil.copy(args.config, results / "config.yaml")
        build_folds(work / "data", args.folds, Path(args.raw))
        shutil.copy(work / "data" / "folds.json", results / "folds.json")
        timings_path = results / "timings.json"
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--results", str(results),
              "--config", args.config, "--seed", str(args.seed), "--train", *args.train,
              "--zero-shot", *args.zero_shot, *(["--tta"] if args.tta else [])]  # fmt: skip
        if args.jobs > 1:  # every training at once, then every evaluation
            timings.update(run_jobs([j for k in folds for j in train_jobs(k, args, work, results)], args.jobs,
                                    args.time_limit))  # fmt: skip
            evaluations = [(f"fold {k} evaluate", [*me, "--stage", "evaluate", "--folds-to-run", str(k)],
                            results / f"fold-{k}" / "evaluate.log") for k in folds]  # fmt: skip
            timings.update(run_jobs(evaluations, args.jobs, None))
            for k in folds:
                keep_training_records(k, args, work, results)
        else:  # fold by fold (the CPU: each fold's tiles are encoded once and cached for the later folds)
            for k in folds:
                log(f"fold {k}: training {', '.join(args.train) or 'nothing'}")
                timings.update(run_jobs(train_jobs(k, args, work, results), 1, args.time_limit))
                keep_training_records(k, args, work, results)
                log(f"fold {k}: evaluating")
                cmd = [*me, "--stage", "evaluate", "--folds-to-run", str(k)]
                timings.update(
                    run_jobs([(f"fold {k} evaluate", cmd, results / f"fold-{k}" / "evaluate.log")], 1, None)
                )
                timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    done = sorted(int(p.parent.name.split("-")[1]) for p in results.glob("fold-*/eval") if any(p.iterdir()))
    summary = summarise(results, done, args.n_bootstrap, args.seed)
    env = json.loads((results / "env.json").read_text()) if (results / "env.json").is_file() else {}
    summary["hardware"] = env.get("gpu") or env.get("cpu")
    (results / "cv_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = table(summary)
    (results / "cv_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
