"""Foundation X's student-teacher: an epoch-wise EMA teacher and a consistency loss to it.

The teacher starts as an exact copy of the student's modules, never receives gradients, and after
each epoch becomes λ·teacher + (1−λ)·student. The consistency term compares student and teacher
embeddings of the same images; only the teacher side is detached, so its gradient reaches the
student (the public code computes it on detached student outputs, so it trains nothing).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CONSISTENCY = ("mse", "cosine")


class Teacher(nn.Module):
    """Frozen EMA copies of the student modules, by name (e.g. ``backbone``, ``loc_encoder``).

    A module of the model (``model.teacher``), so it moves to the device and is checkpointed with
    it; it stays in eval mode (its BatchNorm statistics come from the EMA, not from batches)."""

    def __init__(self, students: dict[str, nn.Module]):
        super().__init__()
        self.copies = nn.ModuleDict({name: copy.deepcopy(m) for name, m in students.items()})
        for p in self.copies.parameters():
            p.requires_grad_(False)
        self.copies.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # model.train() must not switch the teacher to batch statistics

    def forward(self, name: str, *args, **kwargs):
        with torch.no_grad():
            return self.copies[name](*args, **kwargs)

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        """teacher ← λ·teacher + (1−λ)·student for every floating tensor (parameters and BatchNorm
        running statistics); integer buffers (batch counters) are copied."""
        for name, student in students.items():
            t_state = self.copies[name].state_dict()  # detached views of the teacher's own tensors
            for key, s_val in student.state_dict().items():
                t_val = t_state[key]
                if t_val.is_floating_point():
                    t_val.mul_(momentum).add_(s_val.detach().to(t_val.device, t_val.dtype), alpha=1 - momentum)
                else:
                    t_val.copy_(s_val)


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between student and (detached) teacher embeddings; gradients flow into ``student``."""
    student, teacher = student.float(), teacher.detach().float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    raise ValueError(f"consistency_kind={kind!r}; use one of {', '.join(CONSISTENCY)}")


def mix(task: torch.Tensor, consistency: torch.Tensor, c: float) -> torch.Tensor:
    """(1−c)·task + c·consistency (the public code's weighting)."""
    return (1 - c) * task + c * consistency
