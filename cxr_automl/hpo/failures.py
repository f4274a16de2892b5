"""``--max-failures``: when a search whose trials keep failing stops, and the one line it stops with.

Failed trials do not count towards ``n_trials``, so without a limit a search where every trial fails
(a wrong weights path fixed in the space, a dataset that is not mounted) would ask for trials forever.
Only a trial's *own* failures count: not the ones a worker hands back (``surplus``), an interrupted
trial (re-enqueued to resume) or a stale one whose worker died (Optuna fails it; it is re-enqueued).
The rule is read from the study's user attrs by every worker, so all of them stop together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from cxr_automl.errors import TrainingError, UserError

DEFAULT = "50%"
#: a rate is judged only once this many trials have failed (two unlucky trials do not stop a study)
MIN_FAILURES = 3
_NOT_OWN = ("surplus", "interrupted")


class TooManyFailuresError(TrainingError):
    """The search stopped because its trials keep failing; the message names the common reason."""


@dataclass(frozen=True)
class FailureLimit:
    count: int | None = None  # stop once this many trials failed
    rate: float | None = None  # or once this share of the ended trials failed (at least MIN_FAILURES)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.rate * 100:g}%"


def parse(text: str) -> FailureLimit:
    """``N`` (failed trials) or ``P%`` (share of ended trials); one-line error otherwise."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            rate = float(text[:-1]) / 100
            if not 0 < rate <= 1:
                raise ValueError
            return FailureLimit(rate=rate)
        count = int(text)
        if count < 1:
            raise ValueError
        return FailureLimit(count=count)
    except ValueError:
        raise UserError(f"--max-failures {text!r}: use a number of failed trials >= 1 (e.g. 5) or a share of "
                        f"the ended trials (e.g. 50%)") from None


def own_failures(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason")
            and not str(t.user_attrs["fail_reason"]).startswith(_NOT_OWN)]


def common_reason(failed: list[FrozenTrial]) -> tuple[str, int]:
    """The most frequent fail reason (its first line, without the traceback path) and how often."""
    reasons = Counter(str(t.user_attrs["fail_reason"]).split(" (traceback in ")[0] for t in failed)
    return reasons.most_common(1)[0]


def _in_a_row(trials: list[FrozenTrial]) -> int:
    own = {t.number for t in own_failures(trials)}
    ended = [t.number for t in trials if t.number in own or t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    n = 0
    for number in reversed(ended):
        if number not in own:
            break
        n += 1
    return n


def verdict(study: optuna.Study, limit: FailureLimit | None = None) -> str | None:
    """The one line to stop with, or None while the study may go on."""
    limit = limit or parse(study.user_attrs.get("max_failures", DEFAULT))
    trials = study.get_trials(deepcopy=False)
    failed = own_failures(trials)
    if not failed:
        return None
    ended = len(failed) + sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    if limit.count is not None:
        stop = len(failed) >= limit.count
    else:
        stop = len(failed) >= MIN_FAILURES and len(failed) >= limit.rate * ended
    # a backstop for any rate (100% never trips once one trial completed): as many failures in a row
    # as the study wants trials
    stop = stop or _in_a_row(trials) >= max(MIN_FAILURES, int(study.user_attrs.get("n_trials") or 0))
    if not stop:
        return None
    reason, n = common_reason(failed)
    return (f"stopping the search: {len(failed)} of {ended} ended trials failed (--max-failures {limit}); "
            f"most common reason ({n}x): {reason}")
