"""The training layer: one loop (``loop.Trainer``), its step, callbacks, checkpoints, model composition
and per-task evaluation."""
