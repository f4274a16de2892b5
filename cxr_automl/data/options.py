"""The options every record-based dataset shares, declared once.

A loader is written as ``@loader(...) def name(own_option=..., *, task: str, opts: LoaderOptions)``;
the decorator gives the registered factory one flat keyword signature — the loader's own options,
``task`` (defaulting to the layout's natural task) and every field of :class:`LoaderOptions` — so the
registry's check of unknown config keys, ``cxr-automl plugins`` and the config files see them all,
while the loader body receives the shared ones as a single object it hands to ``build_bundle``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

TASKS = ("classification", "detection", "segmentation")


@dataclass(frozen=True)
class LoaderOptions:
    """Preprocessing, cache, splits, label budget and error policy of one dataset."""

    #: square side of the decoded image (the cache stores it at this size)
    image_size: int = 224
    #: stretch | pad (keep the aspect ratio, letterbox)
    fit: str = "stretch"
    #: decode and resize once into a memory-mapped uint8 cache ($CXR_AUTOML_CACHE)
    cache: bool = True
    cache_dir: str | None = None
    #: threads building the cache; 0 = min(8, cores)
    cache_workers: int = 0
    #: seeds the patient-level splits and the label / subset draws
    seed: int = 0
    val_fraction: float = 0.1
    #: share of training images whose labels are kept; every image stays, the rest are unknown (NaN)
    label_fraction: float = 1.0
    #: share of training images kept at all (shrinks the dataset; the others are dropped)
    subset_fraction: float = 1.0
    #: raise | skip (skipped rows are counted and reported)
    on_error: str = "raise"
    augment: bool = True


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LoaderOptions))


def loader(default_task: str = "classification", **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a loader body into a dataset factory (see the module docstring). ``defaults`` override
    :class:`LoaderOptions`' defaults for this loader (``image_size=64`` for MedMNIST)."""
    if default_task not in TASKS:
        raise ValueError(f"default_task={default_task!r}; use one of {', '.join(TASKS)}")
    unknown = set(defaults) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"not a shared loader option: {', '.join(sorted(unknown))}")

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for n, p in inspect.signature(body).parameters.items() if n not in ("task", "opts")]
        base = LoaderOptions(**defaults)
        shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(base, f.name),
                                    annotation=f.type) for f in dataclasses.fields(LoaderOptions)]
        task_param = inspect.Parameter("task", inspect.Parameter.KEYWORD_ONLY, default=default_task, annotation="str")
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p for p in own]
        signature = inspect.signature(body).replace(parameters=[*own, task_param, *shared])

        @functools.wraps(body)
        def factory(**kwargs: Any) -> Any:
            bound = signature.bind(**kwargs)
            bound.apply_defaults()
            args = dict(bound.arguments)
            task = args.pop("task")
            if task not in TASKS:
                raise ValueError(f"task={task!r}; use one of {', '.join(TASKS)}")
            opts = LoaderOptions(**{n: args.pop(n) for n in OPTION_NAMES})
            return body(**args, task=task, opts=opts)

        factory.__signature__ = signature  # type: ignore[attr-defined]
        del factory.__wrapped__  # inspect.signature must read the flat signature, not the body's
        factory.default_task = default_task  # type: ignore[attr-defined]
        return factory

    return wrap
