"""A timm model's ordered blocks, from timm's own fine parameter grouping (``model.group_matcher()``)."""

from __future__ import annotations

from collections import defaultdict

from timm.models import group_parameters
from torch import nn


def grouped_blocks(net: nn.Module) -> list[nn.Module]:
    """``net``'s modules in the order of timm's fine parameter groups (the groups timm's layer-wise LR
    decay uses: stem, then each block; a trailing norm is folded into the last block).

    A group is given as the largest submodules whose parameters all fall in it — a whole residual or Swin
    block, not its convolutions — so that ``eval()`` on a frozen block also reaches its parameter-free
    dropout/drop-path layers. A group of several such modules is an (unregistered) ``nn.ModuleList``.
    """
    group_of = group_parameters(net, net.group_matcher(coarse=False), reverse=True)  # param name -> group
    groups: dict[int, list[nn.Module]] = defaultdict(list)

    def visit(prefix: str, module: nn.Module) -> None:
        ids = {group_of[prefix + n] for n, _ in module.named_parameters()}
        if len(ids) == 1:
            groups[ids.pop()].append(module)
        elif ids:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own:  # a parameter held by a module whose children fall in other groups has no block
                raise ValueError(f"cannot group {prefix}{own[0]}: {type(module).__name__} spans several groups")
            for name, child in module.named_children():
                visit(f"{prefix}{name}.", child)

    visit("", net)
    return [mods[0] if len(mods) == 1 else nn.ModuleList(mods) for _, mods in sorted(groups.items())]
