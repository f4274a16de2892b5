"""The search layer: Optuna studies whose trials are training runs, and the workers, storage and
launchers that let many processes or SLURM tasks share one study."""
