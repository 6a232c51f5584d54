"""Nothing is read from outside what the user named (issue 22).

Readers that follow a path written inside a file (a MetaImage ``ElementDataFile``, the image references of a HEYEX
XML export) or that list a folder the user named (symbolic links in it) resolve every such path and refuse one that
leaves the folder it was found in, with a message naming the file and the path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from octsam.errors import OctSamError


def printable(path: str | os.PathLike) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _outside(named_in, target, folder, resolved) -> OctSamError:
    return OctSamError(
        f"{printable(named_in)}: refers to {printable(target)!r}, which leads outside its folder {printable(folder)} "
        f"(to {printable(resolved)}); refused - octsam reads only files inside the folder of the file or folder you "
        "name. Copy the data there instead of linking or pointing to it."
    )


def is_inside(path: Path, root: Path) -> bool:
    """True if the resolved ``path`` is ``root`` (resolved) or below it."""
    resolved, root = Path(path).resolve(), Path(root).resolve()
    return resolved == root or resolved.is_relative_to(root)


def contained(target: str | os.PathLike, folder: str | os.PathLike, named_in: str | os.PathLike) -> Path:
    """``target`` (a path written in ``named_in``; relative to ``folder`` unless absolute) resolved, when it lies
    inside ``folder``; else an OctSamError naming ``named_in`` and the path."""
    folder = Path(folder)
    raw = Path(target)
    resolved = (raw if raw.is_absolute() else folder / raw).resolve()
    if not is_inside(resolved, folder):
        raise _outside(named_in, target, folder, resolved)
    return resolved


def check_link(path: Path, root: str | os.PathLike) -> Path:
    """``path`` (found by listing the folder ``root``) when it resolves inside ``root``; else (a symbolic link, or a
    file below one, that leads out) an OctSamError naming the link and its target."""
    if not is_inside(path, Path(root)):
        raise _outside(path, os.readlink(path) if path.is_symlink() else path, root, Path(path).resolve())
    return path


def files_under(root: str | os.PathLike, skip_hidden: bool = True) -> Iterator[Path]:
    """Every file below ``root`` (recursive, sorted within each folder; hidden files and folders skipped unless
    ``skip_hidden`` is False) without following symbolic links that leave it: a link (to a file or a folder) whose
    target is outside ``root`` is an OctSamError; a link to a folder inside it is not descended (its files are listed
    under their real place)."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not (skip_hidden and d.startswith(".")))
        for name in dirs:
            if (here / name).is_symlink():
                check_link(here / name, root)
        for name in sorted(f for f in files if not (skip_hidden and f.startswith("."))):
            yield check_link(here / name, root) if (here / name).is_symlink() else here / name


# ------------------------------------------------------------------------------------------------ pickled weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickled_files(folder: str | os.PathLike) -> list[str]:
    """Names of pickle-format weight files (``.bin``/``.pt``/...) directly in ``folder`` (none for a non-folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES))


def pickle_hint(folder: str | os.PathLike) -> str:
    """`` It holds X (pickle format) ...`` when the folder has pickled weights, else ``""``."""
    names = pickled_files(folder)
    if not names:
        return ""
    return (
        f" It holds {', '.join(names[:5])} (pickle format); use safetensors weights instead - convert them where you "
        "trust the file (e.g. `safetensors.torch.save_file(torch.load(PATH, weights_only=True), "
        "'model.safetensors')`) or save the model again with save_pretrained."
    )


def is_pickle_refusal(err: BaseException) -> bool:
    """True when ``err`` (or what it wraps) is torch refusing a pickle (``weights_only``) or a damaged pickle."""
    import pickle

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
