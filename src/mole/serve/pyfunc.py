"""The registered ``mole`` model as MLflow rebuilds it: the pyfunc class, its signature and its environment.

Beside :mod:`mole.tracking` the only module that touches mlflow, and only to define the class MLflow pickles
with every registered version. It lives with serving because it is a way of serving: MLflow's pyfunc server,
MLServer and KServe load it the way :mod:`mole.serve.service` loads a version. A version must load where mole is
not installed (``mlflow models serve``, MLServer, a fresh virtualenv): the ``mole`` package travels with the model
as a code path, and the requirements are the inference stack pinned to the versions that trained it (never
``mole`` itself, which is not on PyPI).
"""

from __future__ import annotations

import base64
import io
import re
from importlib import metadata
from pathlib import Path
from typing import Any

#: What loading and running a registered version imports (mole's own code travels as a code path). The light
#: mlflow-skinny carries pyfunc; the tracking server's stack (SQLAlchemy, Flask ...) is not needed to serve.
INFERENCE_PACKAGES = ("mlflow-skinny", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
                      "numpy", "pandas", "pillow")  # fmt: skip


def requirements() -> list[str]:
    """``NAME==VERSION`` of every inference package as installed here; a local build label (``+cpu``,
    ``+cu130``) is dropped, so that the pin installs on CPU and GPU machines alike."""
    return [f"{name}=={re.sub(r'[+].*$', '', metadata.version(name))}" for name in INFERENCE_PACKAGES]


def signature() -> Any:
    """The model's schema: prompts (and optional settings) in, base64 PNGs out. MLflow checks requests against it
    and serving tools read it."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "prompt"), ColSpec("long", "seed", required=False), ColSpec("long", "steps", required=False),
        ColSpec("double", "guidance", required=False), ColSpec("long", "width", required=False),
        ColSpec("long", "height", required=False),
    ])  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "png")]))


def pyfunc_environment() -> dict[str, Any]:
    """The ``log_model`` arguments that make a version self-contained: the mole package as a code path, the pinned
    requirements and the signature."""
    return {"code_paths": [str(Path(__file__).resolve().parents[1])], "pip_requirements": requirements(),
            "signature": signature()}  # fmt: skip


_PYFUNC: type | None = None


def mole_pyfunc() -> Any:
    """An instance of the text-to-image pyfunc (the class is built on first use, so that importing this
    module does not import mlflow)."""
    global _PYFUNC
    if _PYFUNC is None:
        import mlflow.pyfunc

        class MolePyfunc(mlflow.pyfunc.PythonModel):
            """Text-to-image: a DataFrame with a ``prompt`` column (optional ``seed``, ``steps``, ``guidance``,
            ``width``, ``height``) in; a DataFrame with ``png`` (base64-encoded PNG bytes) out."""

            def load_context(self, context) -> None:
                from mole.generate import load_pipeline

                cfg = context.model_config or {}
                experts = {n: context.artifacts[f"expert_{n}"] for n in cfg.get("experts", [])}
                gates = context.artifacts.get("gates") if cfg.get("gates") else None
                if gates is not None and Path(gates).is_dir():
                    gates = str(Path(gates) / "gates.safetensors")
                self.pipe = load_pipeline(context.artifacts["base"], experts or None, gates)

            def predict(self, context, model_input, params=None):
                import pandas as pd

                from mole.generate import generate

                rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
                out = []
                for row in rows:
                    result = generate(
                        self.pipe, [str(row["prompt"])], seed=int(_given(row, "seed") or 0),
                        steps=int(_given(row, "steps") or 25), guidance=float(_given(row, "guidance") or 7.5),
                        width=int(row["width"]) if _given(row, "width") else None,
                        height=int(row["height"]) if _given(row, "height") else None,
                    )  # fmt: skip
                    buf = io.BytesIO()
                    result.images[0].save(buf, format="PNG")
                    out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
                return pd.DataFrame({"png": out})

        _PYFUNC = MolePyfunc
    return _PYFUNC()


def _given(row: dict[str, Any], key: str) -> Any:
    """A row's value, None when absent or missing (pandas gives NaN for an optional column left empty)."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value
