"""MODEL_DIR: a trained CPS pair as a folder that can be copied, checked and loaded without pickle.

Layout (format version 1)::

    MODEL_DIR/
      model.safetensors   every branch's weights, keys "<branch>.<parameter>" ("a.conv_blocks_context.0...")
                          float tensors stored as float32
      plans.json          the nnU-Net plans the nets were trained with (preprocessing + architecture)
      info.json           free JSON: round, metrics, run settings
      manifest.json       format + version, branch names, SHA-256 and size of each file above, and
                          `manifest_sha256`: the hash of the manifest's own canonical JSON without
                          that key (catches corruption of the manifest itself)

`save_model_dir` writes into a temporary sibling folder and renames it into place, so a reader sees
the old folder or the new one, never half of one. `load_model_dir` verifies every hash before it
parses anything and refuses with a `ModelDirError` that names the offending file. The hashes guard
against corruption and accidental edits; whoever can rewrite the folder can rewrite the manifest
too, so authenticity needs a signature on top (not done here).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from common.atomic_write import atomic_directory
from common.hashing import sha256_file
from common.names import BRANCHES

FORMAT = "fedliver-model-dir"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
PLANS_FILE = "plans.json"
INFO_FILE = "info.json"
MANIFEST_FILE = "manifest.json"
_HASHED_FILES = (WEIGHTS_FILE, PLANS_FILE, INFO_FILE)


class ModelDirError(ValueError):
    """A MODEL_DIR that is missing, incomplete, tampered with or of an unknown format."""


@dataclass
class ModelBundle:
    branches: dict[str, dict[str, torch.Tensor]]   # branch name -> state dict (float32, CPU)
    plans: dict
    info: dict
    manifest: dict
    path: Path | None = field(default=None)

    def build_nets(self, branches: Sequence[str] = BRANCHES, device: torch.device | str = "cpu") -> list[torch.nn.Module]:
        """One STU-Net per named branch, weights loaded (strict), deep supervision off, eval mode."""
        from common.stunet import build_stunet_from_plans

        nets = []
        for name in branches:
            if name not in self.branches:
                raise ModelDirError(f"{self._where(WEIGHTS_FILE)}: no branch {name!r} "
                                    f"(has {', '.join(sorted(self.branches))})")
            state = self.branches[name]
            net = build_stunet_from_plans(self.plans, num_classes=_num_classes(state), deep_supervision=False)
            net.load_state_dict(state, strict=True)
            nets.append(net.to(device).eval())
        return nets

    def _where(self, name: str) -> str:
        return str(self.path / name) if self.path is not None else name


def _num_classes(state: Mapping[str, torch.Tensor]) -> int:
    """Classes of a STU-Net state dict: rows of the full-resolution head's weight (default 2)."""
    heads = sorted((k for k in state if k.startswith("seg_outputs.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    return int(state[heads[-1]].shape[0]) if heads else 2


# --------------------------------------------------------------------------------------------- writing
def save_model_dir(path: Path, branches: Mapping[str, Mapping[str, torch.Tensor]], plans: dict, info: dict) -> None:
    """Write a MODEL_DIR at `path` atomically, replacing an existing one (see module docstring).

    `branches` maps a branch name ("a", "b"; no dots) to its state dict. Float tensors are stored as
    float32 whatever their dtype (fp16 transport must not leak into checkpoints); others as they are.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not branches:
        raise ValueError("save_model_dir: no branches given")
    tensors: dict[str, torch.Tensor] = {}
    for name, state in branches.items():
        if not name or "." in name:
            raise ValueError(f"save_model_dir: branch name {name!r} must be non-empty and contain no '.'")
        for key, value in state.items():
            t = value.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(torch.float32)
            tensors[f"{name}.{key}"] = t.contiguous().clone()  # clone: safetensors refuses shared storage
    plans_text = _json_text(plans, "plans")
    info_text = _json_text(info, "info")

    if path.exists() and not path.is_dir():
        raise ModelDirError(f"{path}: exists and is not a folder")
    with atomic_directory(path) as tmp:  # files are fsynced and the folder swapped in whole
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / PLANS_FILE).write_text(plans_text, encoding="utf-8")
        (tmp / INFO_FILE).write_text(info_text, encoding="utf-8")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "branches": sorted(branches),
            "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in _HASHED_FILES},
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def _json_text(obj, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:  # nan/inf or non-JSON types: refuse before writing anything
        raise ValueError(f"save_model_dir: {what} is not plain JSON ({e})") from None


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- reading
def read_manifest(path: Path) -> dict:
    """Parse and self-check manifest.json; ModelDirError naming it otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a MODEL_DIR folder")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise ModelDirError(f"{file}: missing (not a MODEL_DIR, or an incomplete copy)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{file}: format version {manifest.get('format_version')!r} is not supported "
                            f"(this version reads {FORMAT_VERSION})")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ModelDirError(f"{file}: content does not match its own checksum (edited or corrupted)")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_HASHED_FILES):
        raise ModelDirError(f"{file}: must list exactly {', '.join(_HASHED_FILES)}")
    return manifest


def verify_model_dir(path: Path) -> dict:
    """Check every file against the manifest; returns the manifest. ModelDirError names a bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in _HASHED_FILES:
        file = path / name
        if not file.is_file():
            raise ModelDirError(f"{file}: missing")
        expected = manifest["files"][name]
        if file.stat().st_size != expected.get("bytes") or sha256_file(file) != expected.get("sha256"):
            raise ModelDirError(f"{file}: SHA-256 does not match manifest.json (modified or corrupted)")
    return manifest


def load_model_dir(path: Path) -> ModelBundle:
    """Verify and load a MODEL_DIR (weights on CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = verify_model_dir(path)
    try:
        flat = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{path / WEIGHTS_FILE}: unreadable ({e})") from None
    branches: dict[str, dict[str, torch.Tensor]] = {name: {} for name in manifest.get("branches", [])}
    for key, tensor in flat.items():
        name, _, param = key.partition(".")
        if name not in branches or not param:
            raise ModelDirError(f"{path / WEIGHTS_FILE}: tensor {key!r} belongs to no listed branch")
        branches[name][param] = tensor
    empty = [n for n, s in branches.items() if not s]
    if empty:
        raise ModelDirError(f"{path / WEIGHTS_FILE}: branch {empty[0]!r} has no tensors")
    plans = _load_json(path / PLANS_FILE)
    info = _load_json(path / INFO_FILE)
    return ModelBundle(branches=branches, plans=plans, info=info, manifest=manifest, path=path)


def _load_json(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ModelDirError(f"{file}: expected a JSON object")
    return obj


__all__ = ["ModelBundle", "ModelDirError", "save_model_dir", "load_model_dir", "verify_model_dir",
           "read_manifest", "FORMAT_VERSION"]
