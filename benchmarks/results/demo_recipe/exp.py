import sys; sys.path.insert(0, "/work/tmp/demo"); import patch_opt
import sys, time, json
from pathlib import Path
from dataset_builder.synthetic import build_synthetic
from octsam.config import parse_config
from octsam.training.loop import train
from octsam.evaluation.compare import run_comparison
import os; SEED = int(os.environ.get("DATA_SEED", "0")); out = Path("/work/tmp/demo"); data = out / ("data" if SEED == 0 else f"data_s{SEED}")
if not data.exists():
    build_synthetic("amd", 12, 4, seed=SEED, output=data, size=256, lesion_scale=2.0)
name = sys.argv[1]; extra = sys.argv[2:]
t = time.time()
args = parse_config(["--config", __import__("os").environ.get("CFG", "configs/demo.yaml"), "--dataset", str(data), "--output-dir", str(out / name), "--report-to", "none", *extra])
res = train(*args)
t_train = time.time() - t
s = run_comparison(str(data), adapters={name: str(out / name / "best_adapter")}, output_dir=out / f"{name}_eval", split="test", overwrite=True, verbose=False, n_bootstrap=100)
m = s["methods"][name]
print("RESULT", name, extra, "train_s", round(t_train), "mean_dice", round(m["mean_dice"], 3), {k: round(v["dice_mean"], 3) for k, v in m["per_class"].items()}, "best_epoch", res.get("best_epoch"), "epochs", res.get("epochs_trained"))
