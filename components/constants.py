"""The one place the components' container image is named.

Pinned to the package version, so that a compiled pipeline runs the code it was compiled from. Override it with
``MOLE_IMAGE`` at compile time, or per run with the pipeline's ``image`` parameter (every task is re-pointed at
it). Releases push ``ghcr.io/mole-project/mole:<version>`` built from docker/Dockerfile.
"""

import os

from mole import __version__

IMAGE_REPOSITORY = "ghcr.io/mole-project/mole"
IMAGE = os.environ.get("MOLE_IMAGE") or f"{IMAGE_REPOSITORY}:{__version__}"
