"""Loading local weight files into a backbone (DDP- or teacher-wrapped, timm, torchvision, exported encoders)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cxr_automl.errors import UserError

log = logging.getLogger(__name__)

#: keys under which training scripts commonly nest the state dict, tried in this order
_WRAPPERS = ("state_dict", "model", "teacher", "student", "module", "backbone", "encoder")
#: classifier/projector keys that never match an encoder without such a layer (``load_into``'s default ``drop``;
#: a backbone whose checkpoints carry other task heads adds their prefixes)
DROP_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.", "projector.", "pooler.")


class WeightsError(UserError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (``.pt/.pth/.ckpt`` via weights-only torch.load, or ``.safetensors``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; set weights=PATH to a local checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    for _ in range(3):  # unwrap nested containers such as {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds no state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_into(module: nn.Module, path: str | Path, strict: bool = False,
              prefixes: tuple[str, ...] = ("module.", "backbone.", "encoder.", "model.", "net."),
              transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
              drop: tuple[str, ...] = DROP_PREFIXES) -> tuple[list[str], list[str]]:
    """Load ``path`` into ``module``, stripping wrapper ``prefixes`` and dropping keys under ``drop`` that
    ``module`` does not have (classifiers, projectors); report mismatches.

    ``transform`` runs on the raw state dict before the prefixes are stripped — for a library's own
    converter of an older key layout (e.g. timm's Swin ``checkpoint_filter_fn``). Returns the missing and
    unexpected keys (also logged).
    """
    state = read_state_dict(path)
    if transform is not None:
        state = transform(_strip(state, prefixes, module.state_dict()))
    own = module.state_dict()
    cleaned = {k: v for k, v in _strip(state, prefixes, own).items()
               if not (k.startswith(tuple(drop)) and k not in own)}
    shape_bad = [k for k, v in cleaned.items() if k in own and own[k].shape != v.shape]
    if shape_bad:
        raise WeightsError(f"{path}: shape mismatch for {', '.join(shape_bad[:5])}"
                           f"{' ...' if len(shape_bad) > 5 else ''} — wrong architecture for these weights?")
    result = module.load_state_dict(cleaned, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise WeightsError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} (strict=true)")
    log.info("loaded %s: %d tensors, %d missing, %d unexpected", path, len(cleaned) - len(unexpected),
             len(missing), len(unexpected))
    if missing or unexpected:
        log.warning("weights %s: %d missing %s; %d unexpected %s", path, len(missing), missing[:10],
                    len(unexpected), unexpected[:10])
    return missing, unexpected


def _strip(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], own: dict[str, torch.Tensor],
           ) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.`` from DDP, ``backbone.``...) unless the key is ours as is."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k, changed = key, True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p) and k not in own:
                    k, changed = k[len(p):], True
        out[k] = value
    return out
