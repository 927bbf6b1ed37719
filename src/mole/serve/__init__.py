"""The generation service (`mole serve`): one loaded MoLE model behind HTTP, in modes base, experts and mole.

* :mod:`mole.serve.schemas`: request/response bodies and their bounds (422 on anything outside them);
* :mod:`mole.serve.service`: loading, the three modes on one pipeline, the bounded queue, timeouts, metrics;
* :mod:`mole.serve.app`: the FastAPI routes, the comparison page (``page.html``) and the uvicorn runner;
* :mod:`mole.serve.pyfunc`: the registered model as MLflow serves it (the pyfunc class, signature, environment).

The names below load on first use (PEP 562), so that :mod:`mole.tracking`, which logs the pyfunc, does not
import FastAPI and the service with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Service": "service", "ServiceSettings": "service", "create_app": "app", "make_loader": "app",
            "run_server": "app"}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
