"""The one place the components' container image is named.

Pinned to the package version, so that a compiled pipeline runs the code it was compiled from; better, pinned by
digest (``MOLE_IMAGE_DIGEST=sha256:...`` at compile time: ``ghcr.io/mole-project/mole@sha256:...``), which no
re-pushed tag can change. ``MOLE_IMAGE`` overrides the whole reference at compile time, the pipeline's ``image``
parameter per run (every task is re-pointed at it; the chart passes its own, digest included). Releases push
``ghcr.io/mole-project/mole:<version>`` built from docker/Dockerfile.
"""

import os
import re

from mole import __version__

IMAGE_REPOSITORY = "ghcr.io/mole-project/mole"


def image_reference(environ=os.environ) -> str:
    """``MOLE_IMAGE``, else ``IMAGE_REPOSITORY@MOLE_IMAGE_DIGEST``, else ``IMAGE_REPOSITORY:<version>``."""
    digest = environ.get("MOLE_IMAGE_DIGEST", "")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"MOLE_IMAGE_DIGEST must look like sha256:<64 hex digits>, got {digest!r}")
    return environ.get("MOLE_IMAGE") or (
        f"{IMAGE_REPOSITORY}@{digest}" if digest else f"{IMAGE_REPOSITORY}:{__version__}"
    )


IMAGE = image_reference()
