"""An opt-in compiled UNet for generation and serving (``--compile``): ``torch.compile`` with CUDA graphs.

A 25-step generation calls the UNet 25 times with the same shapes, and at small batches the UNet is launch-bound
(hundreds of small kernels a call, a dozen of them per MoLE layer before issue 16). ``torch.compile`` in
``reduce-overhead`` mode fuses the elementwise steps (the gates' sigmoid and scaling into their neighbours) and
replays each call as one CUDA graph.

It is a GPU feature: on CPU there is no launch overhead to remove and Inductor would spend minutes compiling a
UNet on a small machine, so :func:`compile_unet` logs a warning and leaves the UNet eager. Compilation happens
lazily, at the first call; if it fails there (an unsupported op, a missing compiler), the error is logged as a
warning and that call and every later one run eager: a failed compile never fails a generation.

Gate recording (``mole generate --gate-trace``, the service's ``return_gates``) keeps working: while a MoLE layer
records, the UNet runs eager (recording writes Python attributes in every layer, which a CUDA graph would not
replay), and compiled again afterwards. The compiled UNet reads the gates as they are when it is compiled (they
are frozen then, see :mod:`mole.layers`): load gates before compiling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: torch.compile's mode: Inductor kernels replayed as CUDA graphs (static shapes, as the denoising loop has).
DEFAULT_MODE = "reduce-overhead"


class CompiledForward:
    """Replaces ``unet.forward``: the compiled forward, or the eager one while recording gates or after a failure.

    Attributes:
        failed: The compile error that made this UNet eager for good, or None.
        compiled_calls: Calls that ran compiled (the benchmark and tests read it).
    """

    def __init__(self, unet: nn.Module, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        from mole.inject import mole_layers

        self.eager, self.compiled = eager, compiled
        self.layers = list(mole_layers(unet).values())
        self.failed: str | None = None
        self.compiled_calls = 0
        self._lock = threading.Lock()

    def recording(self) -> bool:
        return any(layer.record_gates for layer in self.layers[:1])  # record_gates sets every layer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None or self.recording():
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:  # any compile failure: eager, logged
            with self._lock:
                if self.failed is None:
                    self.failed = f"{type(err).__name__}: {err}"
                    logger.warning("compiled UNet failed (%s); running eager from now on", self.failed[:500])
            return self.eager(*args, **kwargs)
        self.compiled_calls += 1
        return out


def compile_unet(unet: nn.Module, mode: str = DEFAULT_MODE, allow_cpu: bool = False) -> CompiledForward | None:
    """Compile ``unet`` in place (its ``forward`` becomes a :class:`CompiledForward`); None when it stays eager.

    The gates are frozen and every MoLE layer's stacked weight refreshed first: the compiled graph reads them as
    constants of the call.

    Args:
        unet: The pipeline's UNet, already on its device.
        mode: ``torch.compile`` mode.
        allow_cpu: Compile on CPU too (tests of the fallback; slow on a small machine).
    """
    from mole.inject import mole_layers

    if isinstance(getattr(unet, "forward", None), CompiledForward):
        return unet.forward
    device = next(unet.parameters()).device
    if device.type != "cuda" and not allow_cpu:
        logger.warning("--compile: the UNet is on %s; compiling is for CUDA (CUDA graphs), running eager", device)
        return None
    unet.requires_grad_(False)
    for layer in mole_layers(unet).values():
        layer.refresh()
    eager = unet.forward
    try:
        compiled = torch.compile(eager, mode=mode, dynamic=False)
    except Exception as err:  # torch.compile itself refusing (a platform it lacks)
        logger.warning("--compile: torch.compile failed (%s: %s); running eager", type(err).__name__, err)
        return None
    wrapper = CompiledForward(unet, eager, compiled)
    unet.forward = wrapper
    logger.info("UNet compiled (mode=%s); the first call compiles it", mode)
    return wrapper
