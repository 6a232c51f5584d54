"""The package list in pyproject.toml matches the source tree, so a wheel ships every module and the card templates."""

from __future__ import annotations

import tomllib
from conftest import REPO_ROOT


def test_pyproject_lists_every_package():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO_ROOT).parts)
        for top in ("octsam", "dataset_builder")
        for p in (REPO_ROOT / top).rglob("__init__.py")
    }
    assert listed - {"octsam.model_cards"} == found
    assert config["package-dir"]["octsam.model_cards"] == "model_cards"
    assert (REPO_ROOT / "model_cards" / "adapter_card.md").is_file()


def test_card_templates_found_from_a_checkout():
    from octsam.cards import template_path

    assert template_path("adapter_card.md") == REPO_ROOT / "model_cards" / "adapter_card.md"
    assert template_path("dataset_card.md").is_file()
