"""Rules of the core's layout that a refactor must keep: Optuna's private API only in its adapter."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"optuna\.[a-z_.]*\._[a-z]|\._(study_id|trial_id|storage)\b|_get_stale_trial_ids\(")


def test_optuna_private_api_is_used_only_through_its_adapter():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for folder in ("cxr_automl", "plugins") for p in sorted((ROOT / folder).rglob("*.py"))
            if p.name != "optuna_private.py"
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if PRIVATE.search(line) and not line.lstrip().startswith(("#", "def "))]  # def: implementing it
    assert not hits, "\n".join(hits)
