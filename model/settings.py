"""How the daemon loads and runs the model (the ``model:`` section of the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DropSettings(_Strict):
    """Video-level token dropping inside the LLM (VideoChat-Flash §5)."""

    kind: Literal["uniform", "attention", "uniform0_attention"] = Field(
        "uniform0_attention", description="How visual tokens are chosen at each drop layer."
    )
    layers: tuple[int, ...] = Field(
        (4, 18), description="Drop after these decoder layers (1-based counts of layers done)."
    )
    ratios: tuple[float, ...] = Field(
        (1.0, 0.75, 0.25),
        description="Fraction of the visual tokens kept per stage; one more entry than layers, "
        "the first being 1.0.",
    )

    @model_validator(mode="after")
    def _check(self) -> DropSettings:
        if len(self.ratios) != len(self.layers) + 1:
            raise ValueError("ratios needs exactly one more entry than layers")
        if self.ratios[0] != 1.0:
            raise ValueError("ratios[0] must be 1.0")
        if any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError("every ratio must be in (0, 1]")
        if list(self.ratios) != sorted(self.ratios, reverse=True):
            raise ValueError("ratios must not increase")
        if list(self.layers) != sorted(set(self.layers)) or any(layer < 1 for layer in self.layers):
            raise ValueError("layers must be strictly increasing and >= 1")
        return self


class ModelSettings(_Strict):
    """Which checkpoint to run, where, and how."""

    checkpoint: str = Field(
        "tiny",
        description="'tiny' (built-in random seeded model, no download), a local checkpoint "
        "folder, or a Hugging Face hub id (downloads only where a network exists).",
    )
    tiny_seed: int = Field(0, ge=0, description="Seed of the built-in tiny model's weights.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available, else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU (bf16/fp16 are slow on CPUs)."
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto = flash_attention_2 on CUDA when installed, else sdpa."
    )
    drop: Literal["auto"] | DropSettings | None = Field(
        "auto",
        description="Video-level token dropping: 'auto' = the recipe that fits the checkpoint "
        "(its config.json's, else the model card's uniform0_attention after layers 4 and 18 "
        "for the released 28-layer models, scaled down for 'tiny'); an explicit recipe must "
        "fit the layer count; null switches dropping off.",
    )
    max_frames: int = Field(
        512,
        ge=1,
        le=65_536,
        description="Most frames (of 16 tokens each) one query reads; 512 is VideoChat-Flash's "
        "trained regime. Must fit model.max_context_tokens.",
    )
    max_context_tokens: int = Field(
        32768, ge=256, le=1_048_576, description="Longest prompt (text + visual tokens) accepted."
    )
    encode_batch_clips: int = Field(
        8, ge=1, le=256, description="Most clips encoded in one batched call."
    )
