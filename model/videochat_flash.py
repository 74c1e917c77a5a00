"""VideoChat-Flash assembled: UMT vision encoder -> HiCo projector (ToMe + MLP) -> Qwen2 LLM.

Submodule names: ``vision`` (official ``model.vision_tower.vision_tower.encoder``), ``projector``
(``model.mm_projector``), ``llm`` (``model.*`` and ``lm_head``); see ``weights.NAME_MAP``.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import TOKENS_PER_IMAGE, VideoChatFlashConfig
from model.errors import ModelError
from model.hico import HiCoProjector
from model.prompt import IMAGE_TOKEN_INDEX
from model.qwen2 import Qwen2LM
from model.vision import UMTVisionEncoder


class VideoChatFlash(nn.Module):
    """The whole model. Encoding is batched across clips; the LLM runs one prompt at a time."""

    def __init__(self, config: VideoChatFlashConfig, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.hidden_size = config.llm.hidden_size
        self.frames_per_clip = config.frames_per_clip
        self.tokens_per_clip = config.tokens_per_clip
        self.vision = UMTVisionEncoder(config.vision)
        self.projector = HiCoProjector(
            config.vision.width, config.llm.hidden_size, config.vision.num_heads
        )
        self.llm = Qwen2LM(config.llm, attention)

    def reset_buffers(self) -> None:
        """Recompute computed (non-checkpoint) buffers after weights were loaded onto meta."""
        self.vision.reset_buffers()

    @property
    def device(self) -> torch.device:
        return self.vision.patch_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.patch_embed.proj.weight.dtype

    @torch.no_grad()
    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """Preprocessed clips [B, 4, 3, S, S] -> visual tokens [B, 64, H] (ToMe order).

        One vision forward over the whole batch, then ToMe over every clip at once (each clip is
        merged on its own; all clips have the same token count).
        """
        if clips.dim() != 5 or clips.shape[1] != self.frames_per_clip:
            raise ValueError(
                f"clips must be [B, {self.frames_per_clip}, 3, S, S], got {list(clips.shape)}"
            )
        features = self.vision(clips.to(device=self.device, dtype=self.dtype))  # [B, 4hw, D]
        return self.projector(features, self.tokens_per_clip)  # [B, 64, H]

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """One preprocessed still image [1, 3, S, S] -> [1, 64, H] (image table, no clip merge)."""
        if image.dim() != 4:
            raise ValueError(f"image must be [1, 3, S, S], got {list(image.shape)}")
        tokens = self.config.vision.tokens_per_frame
        if tokens <= TOKENS_PER_IMAGE:
            raise ModelError(
                f"an image gives {tokens} vision tokens at {self.image_size} px; the image path "
                f"needs more than {TOKENS_PER_IMAGE} to merge (the official code asserts it)"
            )
        features = self.vision(image[:, None].to(device=self.device, dtype=self.dtype))
        return self.projector(features, TOKENS_PER_IMAGE)  # [1, 64, H]

    @torch.no_grad()
    def splice(
        self, input_ids: list[int] | torch.Tensor, visual: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Text ids with exactly one −200 placeholder + visual rows -> (inputs_embeds, start).

        ``input_ids`` [L] or [1, L]; ``visual`` [..., H] is flattened clip-major to [N, H].
        Returns inputs_embeds [1, L − 1 + N, H] and the index where the visual rows start.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"input_ids must hold exactly one {IMAGE_TOKEN_INDEX}, found {where}")
        start = where[0]
        text = self.llm.embed(torch.cat((ids[:start], ids[start + 1 :])).to(self.device))
        rows = visual.reshape(-1, self.hidden_size).to(device=self.device, dtype=text.dtype)
        embeds = torch.cat((text[:start], rows, text[start:]), dim=0)  # [L − 1 + N, H]
        return embeds[None], start
