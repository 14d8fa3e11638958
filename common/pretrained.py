"""Load released STU-Net weights (nnU-Net v1 `.model`, v2 `.pth`, `.safetensors`) for fine-tuning.

Every tensor is loaded except the segmentation heads (`seg_outputs.*`), which stay freshly initialised
for the new class count unless asked for (`heads=True`) and of the net's shape. A *pair* checkpoint
(keys `a.<param>` and `b.<param>`, as `simulations/pretrain.py` writes: two nets pretrained from
different seeds) gives each CPS branch its own net, heads included: both branches start trained and
still apart, which one body under two random heads does not give (the second head starts far behind). When the net has more input channels than the checkpoint, the first block's
input convs are repeated along the input-channel axis and divided by the repeat factor, so k copies of
one image give the pretrained activations. Anything else that does not fit is refused.

Files are read with `torch.load(weights_only=True)` (or safetensors): no arbitrary object is unpickled.
nnU-Net's checkpoints also log numpy scalars (losses, Dice), so numpy's scalar/dtype reconstructors,
which only rebuild numbers, are allowlisted for the duration of the load.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic_write import atomic_path
from common.model_dir import load_model_dir
from common.names import BRANCHES

HEAD_PREFIX = "seg_outputs."
# The convs that see the input channels: repeated when the net has more input channels.
INPUT_CONVS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SHOW = 5


@dataclass
class LoadReport:
    """What `load_pretrained` did, by parameter name."""
    path: Path
    loaded: list[str] = field(default_factory=list)      # copied unchanged
    adapted: list[str] = field(default_factory=list)     # input convs repeated over more channels
    skipped: list[str] = field(default_factory=list)     # heads left freshly initialised
    missing: list[str] = field(default_factory=list)     # only when strict_body=False
    unexpected: list[str] = field(default_factory=list)  # only when strict_body=False
    mismatched: list[str] = field(default_factory=list)  # only when strict_body=False

    def summary(self) -> str:
        text = (f"{self.path}: loaded {len(self.loaded)}, adapted {len(self.adapted)}, "
                f"skipped {len(self.skipped)} (heads)")
        problems = [(n, v) for n, v in (("missing", self.missing), ("unexpected", self.unexpected),
                                        ("mismatched", self.mismatched)) if v]
        return text + "".join(f", {n} {len(v)}" for n, v in problems)


def _numpy_safe_globals() -> list:
    """numpy scalar/dtype reconstructors (numpy 2 names plus the numpy 1 `numpy.core` alias)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(c)) for c in "?bhilqBHILQefdg"}
    names = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    return [*((scalar, n) for n in names), np.dtype, *dtypes]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a v1 `.model` (`state_dict`), v2 `.pth` (`network_weights`), a bare
    state dict, or a `.safetensors` file; wrapper prefixes (`module.`, `_orig_mod.`) stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated header, bad offsets, ...
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            detail = (str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
            if isinstance(e, pickle.UnpicklingError) and ("global" in detail or "build" in detail):
                detail = detail.split(" was not an allowed")[0]
                raise ValueError(f"{path}: refused, it holds pickled objects beyond tensors and plain "
                                 f"containers ({detail}); re-save its state dict as .safetensors") from None
            # not a torch file at all (text, truncated zip, ...)
            raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict, got {type(raw).__name__}")
    for key in ("network_weights", "state_dict"):
        if key in raw:
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path}: no state dict found (keys 'network_weights' (v2), 'state_dict' (v1), "
                         f"or a dict of tensors)")
    state = {}
    for name, tensor in raw.items():
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = tensor
    return state


def _adapt_input_conv(source: torch.Tensor, target_shape: torch.Size) -> torch.Tensor | None:
    """Repeat a conv weight (out, in, ...) along `in` to the target's input channels, / factor."""
    if source.shape[0] != target_shape[0] or source.shape[2:] != target_shape[2:]:
        return None
    factor, rest = divmod(target_shape[1], source.shape[1])
    if factor < 2 or rest:
        return None
    return source.repeat(1, factor, 1, 1, 1) / factor


def branch_of_pair(state: dict[str, torch.Tensor], branch: str, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """One branch of a pair checkpoint (every key `a.*` or `b.*`); any other state dict unchanged."""
    if not all(k.split(".", 1)[0] in BRANCHES for k in state):
        return state
    prefix = f"{branch}."
    chosen = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not chosen:
        raise ValueError(f"{path}: pair checkpoint has no branch {branch!r}")
    return chosen


def load_pretrained(net: nn.Module, path: str | Path, *, strict_body: bool = True, branch: str = BRANCHES[0],
                    heads: bool = False) -> LoadReport:
    """Copy a checkpoint's body into `net` in place; the heads (`seg_outputs.*`) are skipped unless
    `heads` and the checkpoint has them in the net's shapes. Of a pair checkpoint, `branch` is read.

    With `strict_body` (the default) any missing or unexpected key or shape mismatch outside the heads
    raises one ValueError listing the first offenders, and nothing is copied. Without it, whatever
    fits is loaded and the rest listed in the report.
    """
    report = LoadReport(Path(path))
    source = branch_of_pair(read_checkpoint(path), branch, path)
    target = net.state_dict()
    updates: dict[str, torch.Tensor] = {}
    for name, dest in target.items():
        if name.startswith(HEAD_PREFIX):
            if heads and name in source and source[name].shape == dest.shape:
                updates[name] = source[name]
                report.loaded.append(name)
            else:
                report.skipped.append(name)
        elif name not in source:
            report.missing.append(name)
        elif source[name].shape == dest.shape:
            updates[name] = source[name]
            report.loaded.append(name)
        elif name in INPUT_CONVS and (adapted := _adapt_input_conv(source[name], dest.shape)) is not None:
            updates[name] = adapted
            report.adapted.append(name)
        else:
            report.mismatched.append(f"{name} {tuple(source[name].shape)} vs net {tuple(dest.shape)}")
    report.unexpected = [n for n in source if n not in target and not n.startswith(HEAD_PREFIX)]

    problems = [(what, items) for what, items in (("missing", report.missing),
                                                  ("unexpected", report.unexpected),
                                                  ("shape mismatch", report.mismatched)) if items]
    if strict_body and problems:
        listing = "; ".join(f"{len(items)} {what}: {', '.join(items[:_SHOW])}"
                            + (", ..." if len(items) > _SHOW else "") for what, items in problems)
        raise ValueError(f"{path}: checkpoint does not fit this STU-Net ({listing})")
    with torch.no_grad():
        for name, tensor in updates.items():
            target[name].copy_(tensor)  # state_dict tensors share storage with the parameters
    return report


def save_safetensors(net_or_state_dict: nn.Module | dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a net's (or a state dict's) tensors as safetensors (contiguous CPU copies), crash-safe."""
    from safetensors.torch import save_file
    state = net_or_state_dict.state_dict() if isinstance(net_or_state_dict, nn.Module) else net_or_state_dict
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def load_initial_weights(net: nn.Module, path: str | Path, branch: str = BRANCHES[0]) -> str:
    """The initial weights of CPS branch `branch`; returns a one-line summary.

    A pair checkpoint file (`a.*`/`b.*`, heads included) gives the branch its own pretrained net,
    heads too where they fit. Any other file (.pth/.model/.safetensors) or a MODEL_DIR (its branch
    "a") gives the body only: heads keep their own initialisation, so the two branches start apart.
    """
    path = Path(path)
    if not path.is_dir():
        return load_pretrained(net, path, branch=branch, heads=True).summary()
    bundle = load_model_dir(path)
    first = BRANCHES[0]
    if first not in bundle.branches:
        raise ValueError(f"{path}: MODEL_DIR has no branch {first!r}")
    body = {k: v for k, v in bundle.branches[first].items() if not k.startswith(HEAD_PREFIX)}
    result = net.load_state_dict(body, strict=False)  # shape mismatches raise here
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: MODEL_DIR branch {first!r} does not fit this STU-Net "
                         f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
    return f"{path}: loaded {len(body)} body tensors of branch {first!r}"
