"""The assembled model on the tiny config: batched clip encoding equals one clip at a time,
splicing, the image path, and the tiny builder's determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import VideoChatFlashConfig
from model.errors import ModelError
from model.tiny import build_tiny, readable_token_ids, tiny_config
from model.videochat_flash import VideoChatFlash

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny() -> VideoChatFlash:
    return build_tiny(seed=3)


def _clips(n: int, seed: int, size: int = 112) -> torch.Tensor:
    return torch.randn(n, 4, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [2, 5])
def test_batched_encoding_equals_one_at_a_time(tiny: VideoChatFlash, batch: int) -> None:
    clips = _clips(batch, seed=batch)
    batched = tiny.encode_clips(clips)
    assert batched.shape == (batch, 64, 64)
    singles = torch.cat([tiny.encode_clips(clips[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(batched, singles, atol=ATOL, rtol=0)


def test_clips_in_a_batch_do_not_influence_each_other(tiny: VideoChatFlash) -> None:
    clips = _clips(3, seed=11)
    changed = clips.clone()
    changed[1] = torch.randn(4, 3, 112, 112)
    a, b = tiny.encode_clips(clips), tiny.encode_clips(changed)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], atol=ATOL, rtol=0)
    assert not torch.allclose(a[1], b[1])


def test_encode_clips_checks_the_frame_count(tiny: VideoChatFlash) -> None:
    with pytest.raises(ValueError, match="clips must be"):
        tiny.encode_clips(torch.zeros(1, 3, 3, 112, 112))


def test_splice_places_visual_rows_at_the_placeholder(tiny: VideoChatFlash) -> None:
    ids = [5, 6, 7, -200, 8, 9]
    visual = tiny.encode_clips(_clips(2, seed=0))  # [2, 64, H]
    embeds, start = tiny.splice(ids, visual)
    assert start == 3 and embeds.shape == (1, 5 + 128, 64)
    text = tiny.llm.embed(torch.tensor([5, 6, 7, 8, 9]))
    torch.testing.assert_close(embeds[0, :3], text[:3])
    torch.testing.assert_close(embeds[0, 3:131], visual.reshape(128, 64))  # clip-major
    torch.testing.assert_close(embeds[0, 131:], text[3:])
    same, _ = tiny.splice(torch.tensor([ids]), visual.reshape(128, 64))
    torch.testing.assert_close(same, embeds)


@pytest.mark.parametrize("ids", [[1, 2, 3], [1, -200, 2, -200]])
def test_splice_needs_exactly_one_placeholder(tiny: VideoChatFlash, ids: list[int]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        tiny.splice(ids, torch.zeros(64, 64))


def test_tiny_image_path_is_refused_clearly(tiny: VideoChatFlash) -> None:
    with pytest.raises(ModelError, match="49 vision tokens"):
        tiny.encode_image(torch.zeros(1, 3, 112, 112))


def test_image_path_uses_the_image_table_and_64_tokens() -> None:
    base = tiny_config()
    config: VideoChatFlashConfig = dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, image_size=224)
    )
    torch.manual_seed(0)
    model = VideoChatFlash(config).eval()
    image = torch.randn(1, 3, 224, 224)
    out = model.encode_image(image)
    assert out.shape == (1, 64, 64)
    with torch.no_grad():
        features = model.vision(image[:, None])  # T == 1: image table
        torch.testing.assert_close(out, model.projector(features, 64))


def test_build_tiny_is_deterministic_per_seed() -> None:
    a, b, c = build_tiny(seed=0), build_tiny(seed=0), build_tiny(seed=1)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if name != "llm.lm_head.bias":  # the readability bias is the same for every seed
            assert not torch.equal(pa, pc), name


def test_bfloat16_model_encodes_in_bfloat16() -> None:
    model = build_tiny(seed=0).to(torch.bfloat16)
    out = model.encode_clips(_clips(2, seed=5))  # float32 input is cast to the model dtype
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 64)
    assert torch.isfinite(out.float()).all()


def test_tiny_model_answers_are_readable() -> None:
    """The demo's model is random, but what it prints is printable text (no U+FFFD, no controls)."""
    from model.generation import SamplingParams, generate
    from model.prompt import byte_level_tokenizer

    model, tokenizer = build_tiny(seed=0), byte_level_tokenizer()
    readable = set(readable_token_ids(model.llm.lm_head.out_features))
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.5)]:
        embeds = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(seed))
        tokens = generate(
            model.llm,
            embeds,
            visual_start=0,
            visual_len=0,
            drop=None,
            sampling=SamplingParams(max_new_tokens=48, temperature=temperature, top_p=1.0),
            stop_ids=frozenset(),
        )
        assert tokens and set(tokens) <= readable, tokens
        text = tokenizer.decode(tokens)
        assert "\ufffd" not in text and all(c == "\n" or c.isprintable() for c in text), text
