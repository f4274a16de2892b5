"""Every use of Optuna's private API, in one place, each with why the public API does not serve.

Optuna 5 keeps storages, trial ids and the heartbeat protocol internal; a worker pool that revives a
requeued trial, publishes worker presence and judges stale trials needs them. If Optuna changes them,
this is the only module to adapt (the pin is ``optuna>=5,<6``).
"""

from __future__ import annotations

import optuna
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled  # noqa: F401 - re-exported

__all__ = ["BaseHeartbeat", "is_heartbeat_enabled", "revive", "stale_trial_ids", "storage_of", "study_id",
           "trial_id"]


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study: storage methods (system attrs, trials by state) take the id, and
    ``Study`` does not expose it publicly."""
    return study._study_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a loaded study writes to (study-level system attrs have no public setter)."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (``number`` is per study; storages key trials by id), for heartbeats
    and for reviving a trial."""
    return trial._trial_id


def revive(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A live ``Trial`` for a RUNNING trial this process did not ask for (a requeued SLURM task takes its
    trial back): ``study.ask`` can only create new trials."""
    return optuna.Trial(study, frozen._trial_id)


def stale_trial_ids(storage: optuna.storages.BaseStorage, sid: int) -> set[int]:
    """RUNNING trials whose heartbeat expired, as the storage judges them (empty without heartbeats);
    ``optuna.storages.fail_stale_trials`` acts on them but does not say which they are."""
    get = getattr(storage, "_get_stale_trial_ids", None)
    return set(get(sid)) if get is not None else set()
