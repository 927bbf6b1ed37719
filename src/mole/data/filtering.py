"""The filter registry: the curation config's filter names → filter classes, built and run in order.

Its own module so that the filters import one way only: :mod:`mole.data.person` and :mod:`mole.data.quality`
build on :mod:`mole.data.filters`, and this registry names all three (person and quality lazily: torch and the
detectors load only when a config asks for them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from mole.data.filters import BlurFilter, FaceFilter, ImageFilter


def _person_filter() -> type[ImageFilter]:
    from mole.data.person import PersonFilter  # its own module: detectors and the body-from-face estimate

    return PersonFilter


def _quality_filter() -> type[ImageFilter]:
    from mole.data.quality import QualityFilter  # torch is only imported when this filter is asked for

    return QualityFilter


#: Filter name → its class (loaded lazily); the class's keyword arguments are the filter's options.
FILTERS: dict[str, Callable[[], type[ImageFilter]]] = {
    "blur": lambda: BlurFilter,
    "face": lambda: FaceFilter,
    "person": _person_filter,
    "quality": _quality_filter,
}


def build_filters(config: Mapping[str, Mapping[str, Any] | None]) -> list[ImageFilter]:
    """Filters in config order, e.g. ``{"blur": {"min_variance": 50}, "person": {"min_area_fraction": 0.02}}``.

    Raises:
        ValueError: an unknown filter name, an unknown option (both named, with the known ones), or an
            invalid value.
    """
    filters: list[ImageFilter] = []
    for name, options in config.items():
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r} (known: {', '.join(FILTERS)})")
        options = dict(options or {})
        cls = FILTERS[name]()
        known = [
            n for n, p in inspect.signature(cls).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"filters.{name}: unknown option {unknown[0]!r} (known: {', '.join(known)})")
        try:
            filters.append(cls(**options))
        except (TypeError, ValueError) as err:
            raise ValueError(f"filters.{name}: {err}") from err
    return filters


def run_filters(filters: Sequence[ImageFilter], image: Image.Image) -> tuple[bool, dict[str, float], str | None]:
    """Apply ``filters`` in order, stopping at the first rejection (later, costlier ones are skipped).

    Returns:
        Whether every filter passed, the scores computed so far by filter name, and the first rejection's
        reason (None when passed).
    """
    scores: dict[str, float] = {}
    for f in filters:
        result = f(image)
        scores[f.name] = float(result.score)
        if not result.passed:
            return False, scores, result.reason or f"{f.name} filter"
    return True, scores, None
