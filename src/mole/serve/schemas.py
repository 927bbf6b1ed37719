"""Request and response bodies of the generation service, with the limits that keep it alive.

Every bound is a field constraint, so a bad request is answered 422 before it costs any compute; the one
check that needs the model (the prompt's length in CLIP tokens) is made by the service with the pipeline's
own tokenizer.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mole.generate import MAX_GUIDANCE
from mole.layers import RunMode

#: Side bounds in pixels: below 64 the VAE has almost nothing to decode; above 1024 one SD1.5 image holds a
#: GPU for tens of seconds and its attention memory grows with the fourth power of the side.
MIN_SIDE = 64
MAX_SIDE = 1024
#: Denoising steps: the paper samples with 25-50; more buys nothing but time.
MAX_STEPS = 100
#: Images in one request (each one is a full denoising run).
MAX_IMAGES = 4
#: Characters, checked before tokenizing so that a megabyte prompt never reaches the tokenizer.
MAX_PROMPT_CHARS = 2000
#: The largest seed: JavaScript numbers are exact up to 2**53, and torch seeds take 64 bits.
MAX_SEED = 2**32 - 1

Mode = RunMode  # the mode names live with the layer (mole.layers.RUN_MODES)
#: What each mode runs on the one loaded model (the paper's table 2 rows).
MODE_HELP = {
    "base": "the model with every MoLE contribution off",
    "experts": "every expert at weight 1, gates bypassed (the '+experts' ablation)",
    "mole": "the learned gates (full MoLE)",
}

Side = Annotated[
    int | None,
    Field(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=8,
        description=f"Pixels, a multiple of 8 in {MIN_SIDE}..{MAX_SIDE}; default: the model's native size.",
    ),
]


class GenerateRequest(BaseModel):
    """``POST /v1/generate``. Unknown fields are refused, so that a misspelled option is not silently ignored, and
    types are strict (``"steps": "2"`` or ``"return_gates": "yes"`` is a 422, not a guess)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw (at most 77 CLIP tokens)."
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (at most 77 CLIP tokens)."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the first image; image k uses seed + k.")
    steps: int = Field(default=25, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance: float = Field(
        default=7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance scale."
    )
    width: Side = None
    height: Side = None
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES, description="Images for this prompt.")
    mode: Mode | None = Field(
        default=None,
        description="base, experts or mole; default: the richest the model has (mole, else experts, else base).",
    )
    return_gates: bool = Field(
        default=False, description="mode=mole only: also return the mean gate value per expert at every step."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class GeneratedImage(BaseModel):
    seed: int
    png_base64: str = Field(description="The PNG file, base64-encoded.")


class GateValues(BaseModel):
    """Mean gate value per expert at every denoising step (averaged over layers, tokens and the CFG batch)."""

    experts: list[str]
    local: list[list[float]] = Field(description="[steps][experts]; empty when the gates have no local part.")
    global_: list[list[float]] = Field(
        alias="global", description="[steps][experts]; empty when the gates have no global part."
    )

    model_config = ConfigDict(populate_by_name=True)


class GenerateResponse(BaseModel):
    mode: Mode
    width: int
    height: int
    steps: int
    guidance: float
    images: list[GeneratedImage]
    gates: GateValues | None = None
    queue_seconds: float = Field(description="Time the request waited for a worker.")
    generate_seconds: float = Field(description="Time the generation itself took.")
