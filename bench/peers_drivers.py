"""The peers' own drivers for ``bench/peers.py``, each run by the python of the peer's venv.

    python bench/peers_drivers.py ray SPEC.json           # Ray Tune + ASHA over our training function
    python bench/peers_drivers.py ultralytics SPEC.json   # YOLO("yolov8n.yaml").tune(...)

SPEC.json holds the arm's settings (written by peers.py). Running the same command again after an
interrupt resumes the way the peer itself resumes (Tuner.restore, tune(resume=True)). The last line
printed is a JSON summary (``finished``: trials the peer holds as finished).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def ray_arm(spec: dict) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cxr_automl.hpo import searchspace

    space = searchspace.load(spec["space"])
    metric, mode = space.metric, "max" if space.direction == "maximize" else "min"
    out = Path(spec["out"]).resolve()

    def trainable(params: dict) -> None:
        from cxr_automl import config
        from cxr_automl.train import run as run_mod
        from cxr_automl.train.loop import Callback

        class Report(Callback):
            def on_epoch_end(self, trainer, metrics):  # noqa: ANN001 - the loop's callback hook
                value = metrics.get(metric)
                if value is not None and math.isfinite(value):
                    tune.report({metric: value, "epoch": int(metrics["epoch"]) + 1})

        overrides = [*space.overrides, *spec["overrides"],
                     *(f"{k}={searchspace.format_value(v)}" for k, v in params.items())]
        run_dir = out / "runs" / tune.get_context().get_trial_id()
        run_mod.train(config.compose(overrides), run_dir, [Report()])

    ray.init(num_cpus=spec["slots"], include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    path = out / "ray" / "peers"
    wrapped = tune.with_resources(trainable, {"cpu": 1})
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=wrapped, resume_errored=True)
    else:
        tuner = tune.Tuner(
            wrapped, param_space={},
            tune_config=tune.TuneConfig(
                num_samples=spec["n_trials"], max_concurrent_trials=spec["slots"],
                search_alg=OptunaSearch(space=space.params, metric=metric, mode=mode, seed=spec["seed"]),
                scheduler=ASHAScheduler(metric=metric, mode=mode, time_attr="epoch", max_t=spec["epochs"],
                                        grace_period=spec["grace"])),
            run_config=tune.RunConfig(name="peers", storage_path=str(out / "ray"), verbose=0))
    grid = tuner.fit()
    finished = sum(1 for r in grid if r.error is None and r.metrics and r.metrics.get("done", True))
    return {"finished": finished, "errors": grid.num_errors, "trials": len(grid)}


def ultralytics_arm(spec: dict) -> dict:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    font = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(spec["out"]) / "yolo-config"))) / "Ultralytics"
    if not (font / "Arial.ttf").exists():  # else it fetches Arial.ttf from the network
        import shutil

        import matplotlib
        font.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font / "Arial.ttf")
    import torch
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils
    torch_utils.NUM_THREADS = torch.get_num_threads()
    project = Path(spec["out"]).resolve() / "ultralytics"
    resume = (project / "tune" / "tune_results.ndjson").is_file()
    YOLO("yolov8n.yaml").tune(data=spec["data"], epochs=spec["epochs"], iterations=spec["n_trials"],
                              imgsz=spec["size"], batch=spec["batch"], workers=0, device="cpu", pretrained=False,
                              seed=spec["seed"], plots=False, save=False, val=True, amp=False,
                              project=str(project), name="tune", exist_ok=True, resume=resume, verbose=False)
    rows = (project / "tune" / "tune_results.ndjson").read_text().splitlines()
    return {"finished": len([r for r in rows if r.strip()])}


if __name__ == "__main__":
    arm, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    result = {"ray": ray_arm, "ultralytics": ultralytics_arm}[arm](spec)
    print(json.dumps(result))
