"""Which GPU and which CPUs each local worker gets: worker i on GPU i, the machine's CPUs split between them.

Under Slurm nothing here runs: each array task sees the GPUs Slurm gave it (``--slurm.gpus-per-task``
sets ``CUDA_VISIBLE_DEVICES`` per task) and its ``--slurm.cpus-per-task`` CPUs, and the trainer takes
``cuda`` (the first visible GPU) and its DataLoader workers from there (``TrainerConfig.workers``).
"""

from __future__ import annotations

import os


def gpu_count() -> int:
    """GPUs this process can use (0 without CUDA); respects ``CUDA_VISIBLE_DEVICES``."""
    import torch
    return torch.cuda.device_count()


def visible_gpus(spec: str = "auto") -> list[str]:
    """The GPU ids to hand out to local workers, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``auto``: every GPU this process sees (the entries of ``CUDA_VISIBLE_DEVICES`` when it is set, so a
    worker's value names the same physical GPU); ``none``: do not pin; ``0,2,3``: exactly those.
    """
    spec = spec.strip()
    if spec == "none":
        return []
    if spec != "auto":
        ids = [s.strip() for s in spec.split(",") if s.strip()]
        if not ids or not all(s.isdigit() for s in ids):
            raise ValueError(f"--gpus {spec!r}: use auto, none or GPU ids such as 0,1,2,3")
        return ids
    n = gpu_count()
    inherited = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return inherited[:n] if inherited else [str(i) for i in range(n)]


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: taskset, cgroups, a Slurm allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def worker_cpus(index: int, workers: int, cpus: list[int]) -> list[int]:
    """Worker ``index``'s share of ``cpus``: contiguous, disjoint blocks (one CPU each, shared in turn,
    when there are more workers than CPUs)."""
    if workers > len(cpus):
        return [cpus[index % len(cpus)]]
    k = len(cpus) // workers
    return cpus[index * k:(index + 1) * k]


def worker_env(index: int, workers: int, gpus: list[str], cpus: list[int]) -> dict[str, str]:
    """Environment of local worker ``index``: its GPU (``CUDA_VISIBLE_DEVICES``; round robin when
    there are more workers than GPUs) and intra-op threads for its share of the CPUs."""
    env = {"OMP_NUM_THREADS": str(len(worker_cpus(index, workers, cpus)))}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def describe() -> str:
    """One line for a worker's log: what it was given."""
    cpus = available_cpus()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    return (f"CUDA_VISIBLE_DEVICES={gpus}, {len(cpus)} CPU(s) {cpus[:8]}{'...' if len(cpus) > 8 else ''}"
            + (f", SLURM_CPUS_PER_TASK={slurm}" if slurm else ""))
