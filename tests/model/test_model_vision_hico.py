"""Unit tests of the vision encoder, the ToMe functions, the projector and preprocessing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.hico import (
    HiCoProjector,
    MergePlan,
    bipartite_soft_matching,
    head_chunk_metric,
    merge_schedule,
    merge_weighted,
    tome_merge,
)
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_frames
from model.vision import (
    Attention,
    UMTVisionEncoder,
    VisionConfig,
    positional_table,
    sinusoid_table,
)

SMALL = VisionConfig(image_size=224, width=32, declared_layers=4, num_heads=4)


# --- merge schedule and ToMe ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_tokens", "steps"),
    [
        (3136, (1568, 784, 392, 196, 98, 34)),  # 448 video clip
        (784, (392, 196, 98, 34)),  # 224 video clip, and a 448 image: 784 -> 392 -> … -> 64
        (196, (98, 34)),  # 224 image
        (65, (1,)),
    ],
)
def test_merge_schedule(n_tokens: int, steps: tuple[int, ...]) -> None:
    assert merge_schedule(n_tokens, 64) == steps
    assert n_tokens - sum(steps) == 64


@pytest.mark.parametrize("n_tokens", [64, 49])
def test_merge_schedule_needs_more_tokens_than_target(n_tokens: int) -> None:
    with pytest.raises(ValueError, match="more than 64"):
        merge_schedule(n_tokens, 64)


def test_head_chunk_metric_averages_contiguous_chunks() -> None:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    metric = head_chunk_metric(x, num_heads=4)  # 4 chunks of 2 channels
    assert metric.shape == (2, 3, 2)
    torch.testing.assert_close(metric[0, 0], torch.tensor([3.0, 4.0]))  # mean of 0,2,4,6 / 1,3,5,7


def test_matching_order_unmerged_by_descending_score_then_all_b() -> None:
    # Slots: A = 0, 2, 4 ; B = 1, 3, 5. A0 ~ B1 exactly; A2 close to B0; A1 far from everything.
    directions = {
        "a0": [1.0, 0.0, 0.0],
        "a1": [0.0, 0.0, 1.0],
        "a2": [0.0, 1.0, 0.2],
        "b0": [0.0, 1.0, 0.0],
        "b1": [1.0, 0.0, 0.0],
        "b2": [-1.0, -1.0, 0.0],
    }
    order = ["a0", "b0", "a1", "b1", "a2", "b2"]
    x = torch.tensor([[directions[n] for n in order]])  # [1, 6, 3]
    plan = bipartite_soft_matching(x, r=1)
    assert plan.merged.tolist() == [[0]] and plan.partners.tolist() == [[1]]
    assert plan.unmerged.tolist() == [[2, 1]]  # a2 (score ~0.98) before a1 (score 0)
    out, size = merge_weighted(x, torch.ones(1, 6, 1), plan)
    expected = torch.tensor([[directions[n] for n in ("a2", "a1", "b0", "b1", "b2")]])
    torch.testing.assert_close(out, expected)  # a0 == b1, so their average is b1 itself
    assert size.flatten().tolist() == [1, 1, 1, 2, 1]


def test_merge_is_size_weighted() -> None:
    x = torch.tensor([[[3.0], [0.0], [9.0], [6.0]]])  # A = 3, 9 ; B = 0, 6
    size = torch.tensor([[[2.0], [1.0], [1.0], [1.0]]])
    plan = MergePlan(
        unmerged=torch.tensor([[1]]), merged=torch.tensor([[0]]), partners=torch.tensor([[1]])
    )
    out, new_size = merge_weighted(x, size, plan)
    # A0 (value 3, size 2) joins B1 (value 6, size 1): (2·3 + 6) / 3 = 4.
    assert out.flatten().tolist() == [9.0, 0.0, 4.0]
    assert new_size.flatten().tolist() == [1.0, 1.0, 3.0]


def test_tome_merge_batched_equals_each_row() -> None:
    x = torch.randn(3, 196, 32, generator=torch.Generator().manual_seed(0))
    batched = tome_merge(x, 64, num_heads=4)
    assert batched.shape == (3, 64, 32)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], tome_merge(x[i : i + 1], 64, 4))


def test_tome_preserves_the_size_weighted_mean() -> None:
    # Every merge is a weighted average, so the mean over patches (weights = sizes) is kept.
    x_start = torch.randn(1, 784, 16, generator=torch.Generator().manual_seed(1))
    x = x_start
    mean_before = x.mean(dim=1)
    size = torch.ones_like(x[..., :1])
    for r in merge_schedule(784, 64):
        x, size = merge_weighted(x, size, bipartite_soft_matching(head_chunk_metric(x, 4), r))
    assert x.shape == (1, 64, 16) and size.sum().item() == 784
    torch.testing.assert_close((x * size).sum(dim=1) / 784, mean_before, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, tome_merge(x_start, 64, 4), atol=1e-6, rtol=0)


def test_projector_is_tome_then_exact_gelu_mlp() -> None:
    torch.manual_seed(0)
    projector = HiCoProjector(vision_width=32, hidden_size=24, num_heads=4)
    features = torch.randn(2, 196, 32)
    merged = projector.merge(features, 64)
    lin1, lin2 = projector.mlp[0], projector.mlp[2]
    assert isinstance(lin1, torch.nn.Linear) and isinstance(lin2, torch.nn.Linear)
    expected = lin2(F.gelu(lin1(merged), approximate="none"))
    torch.testing.assert_close(projector(features, 64), expected)


# --- positional tables and encoder -----------------------------------------------------------


def test_sinusoid_even_sin_odd_cos() -> None:
    table = sinusoid_table(10, 6)
    n, j = 7, 4
    assert table[n, j] == pytest.approx(math.sin(n / 10000 ** (2 * (j // 2) / 6)))
    assert table[n, j + 1] == pytest.approx(math.cos(n / 10000 ** (2 * (j // 2) / 6)))


@pytest.mark.parametrize("grid", [28, 14, 7])
def test_image_table_is_frame_zero_of_video_table(grid: int) -> None:
    video = positional_table(32, grid, 4)
    image = positional_table(32, grid, 1)
    assert video.shape == (1, 4 * grid * grid, 32) and image.shape == (1, grid * grid, 32)
    torch.testing.assert_close(image[0], video[0, : grid * grid])


def test_umt_large_builds_23_blocks_without_k_bias_or_pos_embed_parameters() -> None:
    with torch.device("meta"):
        encoder = UMTVisionEncoder(VisionConfig())
    assert len(encoder.blocks) == 23
    names = [name for name, _ in encoder.named_parameters()]
    assert len(names) == 2 + 23 * 13 + 2
    assert not any("k_bias" in n or "pos_embed" in n for n in names)
    assert encoder.pos_embed.shape == (1, 3136, 1024)


def test_attention_uses_q_and_v_bias_and_zero_k_bias() -> None:
    torch.manual_seed(0)
    attn = Attention(SMALL)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 32)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    heads = lambda t: t.reshape(2, 5, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(x @ w_q.T + attn.q_bias), heads(x @ w_k.T), heads(x @ w_v.T + attn.v_bias)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected)


def test_still_image_uses_image_table_and_reset_buffers_rebuilds_tables() -> None:
    torch.manual_seed(0)
    encoder = UMTVisionEncoder(SMALL).eval()
    images = torch.randn(1, 1, 3, 224, 224)
    clip = images.expand(1, 4, 3, 224, 224)
    with torch.no_grad():
        out_image, out_clip = encoder(images), encoder(clip)
    assert out_image.shape == (1, 196, 32) and out_clip.shape == (1, 784, 32)
    before = encoder.pos_embed.clone()
    encoder.pos_embed = torch.zeros_like(before)
    encoder.reset_buffers()
    torch.testing.assert_close(encoder.pos_embed, before)
    with pytest.raises(ValueError, match="expected"):
        encoder(torch.randn(1, 3, 3, 224, 224))


def test_different_sizes_change_the_token_count() -> None:
    config = dataclasses.replace(SMALL, image_size=112)
    encoder = UMTVisionEncoder(config).eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 4, 3, 112, 112)).shape == (2, 196, 32)


# --- preprocessing -----------------------------------------------------------------------------


def test_preprocess_resizes_to_a_square_without_crop() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 90, 160, 3), dtype=np.uint8)
    out = preprocess_frames(frames, 112)
    assert out.shape == (2, 3, 112, 112) and out.dtype == torch.float32
    pil = np.array(Image.fromarray(frames[1]).resize((112, 112), Image.Resampling.BICUBIC))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = ((torch.from_numpy(pil).float() / 255 - mean) / std).permute(2, 0, 1)
    torch.testing.assert_close(out[1], expected)


def test_preprocess_constant_frame_and_tensor_input() -> None:
    frames = torch.full((1, 50, 70, 3), 255, dtype=torch.uint8)
    out = preprocess_frames(frames, 32)
    for c in range(3):
        expected = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((32, 32), expected))


def test_preprocess_rejects_non_uint8_frames() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), dtype=np.float32), 8)
