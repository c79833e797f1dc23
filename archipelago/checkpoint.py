"""Checkpoint folders: safetensors files plus a JSON manifest with the sha256 of every file.

Used by the island (model, inner optimizer, data cursor) and the coordinator (θ_g, θ_b, outer
optimizer state). A checkpoint is written into a temporary sibling folder, every file fsynced,
then renamed into place, so a crash never leaves a half-written checkpoint under the final name.
Reading verifies every file's sha256 before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from archipelago.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupt."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str | os.PathLike, files: dict[str, dict[str, torch.Tensor]],
                     meta: dict[str, Any]) -> Path:
    """Write `files` ({"model.safetensors": {name: tensor}, ...}) and a manifest into `path`.

    Tensors are saved contiguous and detached; tensors that share storage must be passed once
    (safetensors refuses aliases). Returns the final folder.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    digests = {}
    for name, tensors in files.items():
        target = tmp / name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(target))
        with open(target, "rb") as fh:
            os.fsync(fh.fileno())
        digests[name] = sha256_file(target)
    manifest = {"format": FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": digests, **meta}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint manifest {manifest_path} has an unknown format")
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest, after checking every listed file exists and matches its sha256."""
    folder = Path(path)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise CheckpointError(f"checkpoint file {file}: sha256 mismatch (manifest {expected[:12]}…, "
                                  f"file {actual[:12]}…)")
    return manifest


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(files, manifest) of a verified checkpoint folder."""
    folder = Path(path)
    manifest = verify_checkpoint(folder)
    files = {name: load_file(str(folder / name)) for name in manifest["files"]}
    return files, manifest


def prune_checkpoints(parent: str | os.PathLike, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` folders named `{prefix}NNN...` under `parent`."""
    if keep <= 0:
        return
    folders = sorted(p for p in Path(parent).glob(f"{prefix}*") if p.is_dir() and not p.name.startswith("."))
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
