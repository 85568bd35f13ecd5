"""Nyström attention (``wsi_mil.mil.models.nystrom``) against exact references."""

from __future__ import annotations

import json

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models import create_aggregator
from wsi_mil.mil.models.nystrom import (
    compact,
    exact_attention,
    nystrom_attention,
    pinv_iterative,
)


def _qkv(b: int, h: int, t: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))


def test_pinv_iterative_matches_linalg_pinv() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64), dim=-1)
    approx = pinv_iterative(a, iterations=30)
    assert torch.allclose(approx, torch.linalg.pinv(a), atol=1e-8)


def test_nystrom_is_exact_when_each_landmark_is_one_distinct_token() -> None:
    """Tokens repeated in pairs: each landmark (the mean of a pair) is one distinct token,
    so the Nyström factorisation reproduces softmax attention exactly."""
    q, k, v = _qkv(2, 3, 5, 4)
    q, k = q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2)  # 10 tokens
    v = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    with torch.autocast("cpu", enabled=False):
        ref, ref_first = exact_attention(q.float(), k.float(), v.float(), mask, 0.0)
    out, first = nystrom_attention(
        q.float(), k.float(), v.float(), mask, landmarks=5, iterations=40
    )
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.allclose(first, ref_first, atol=1e-4)


def test_nystrom_ignores_padding_and_matches_the_bag_alone() -> None:
    q, k, v = (z.float() for z in _qkv(1, 2, 12, 8, seed=2))
    pad = torch.full((1, 2, 5, 8), 1e3)
    mask = torch.tensor([[True] * 12 + [False] * 5])
    alone = nystrom_attention(q, k, v, torch.ones(1, 12, dtype=torch.bool), landmarks=4)
    padded = nystrom_attention(*(torch.cat([z, pad], dim=2) for z in (q, k, v)), mask, landmarks=4)
    assert torch.allclose(padded[0][:, :, :12], alone[0], atol=1e-5)
    assert torch.allclose(padded[1][..., :12], alone[1], atol=1e-6)
    assert torch.all(padded[1][..., 12:] == 0)


def test_nystrom_approximates_exact_attention_on_a_long_bag() -> None:
    """Smooth (low-rank) attention over 2,000 tokens, 64 landmarks: close to exact once
    the pseudo-inverse has converged; the paper's 6 steps still beat uniform weights."""
    g = torch.Generator().manual_seed(3)
    t, d = 2000, 16
    pos = torch.linspace(0, 1, t)[:, None]
    k = (torch.cat([pos, pos**2], 1) @ torch.randn(2, d, generator=g))[None, None]
    q = torch.randn(1, 1, t, d, generator=g) * 0.3
    v = torch.randn(1, 1, t, d, generator=g)
    mask = torch.ones(1, t, dtype=torch.bool)
    ref, _ = exact_attention(q, k, v, mask, 0.0)
    out, first = nystrom_attention(q, k, v, mask, landmarks=64, iterations=20)
    assert (out - ref).norm() / ref.norm() < 0.01
    assert torch.allclose(first.sum(-1), torch.ones(1, 1))
    paper, _ = nystrom_attention(q, k, v, mask, landmarks=64)
    uniform = v.mean(dim=2, keepdim=True)
    assert (paper - ref).norm() < 0.6 * (uniform - ref).norm()


def test_compact_moves_valid_tokens_first_in_order() -> None:
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    idx = compact(mask)
    assert idx.tolist() == [[1, 3, 4], [0, 1, 2]]


def test_transmil_nystrom_is_default_and_runs_a_bag_beyond_exact_memory() -> None:
    """20,000 tiles: exact attention would need 8 heads × 20,001² floats per layer."""
    model = create_aggregator("transmil", 6, 2, hidden_dim=32, n_heads=2, landmarks=16).eval()
    assert model.aggregator_config["attention"] == "nystrom"
    with torch.no_grad():
        out = model(torch.randn(1, 20_000, 6))
    assert torch.isfinite(out.logits).all()
    assert out.attention is not None and torch.allclose(out.attention.sum(), torch.tensor(1.0))


def test_transmil_exact_and_nystrom_agree_below_the_landmark_count() -> None:
    x = torch.randn(2, 30, 6)
    torch.manual_seed(0)
    exact = create_aggregator("transmil", 6, 2, hidden_dim=16, n_heads=2, attention="exact")
    nystrom = create_aggregator("transmil", 6, 2, hidden_dim=16, n_heads=2, landmarks=64)
    nystrom.load_state_dict(exact.state_dict())
    a, b = exact.eval()(x), nystrom.eval()(x)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"attention": "linear"}, {"landmarks": 0}, {"pinv_iterations": 0}, {"pinv_iterations": 21}],
)
def test_transmil_bad_attention_options(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="transmil"):
        create_aggregator("transmil", 6, 2, hidden_dim=16, n_heads=2, **options)


def test_fold_saved_before_nystrom_loads_with_exact_attention(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A fold.json without ``attention`` was trained with exact attention."""
    from wsi_mil.mil.fold import FoldModel
    from wsi_mil.mil.heads import ClassificationHead
    from wsi_mil.mil.tabular import TabularPreprocessor

    model = create_aggregator("transmil", 6, 2, hidden_dim=16, n_heads=2, attention="exact")
    head = ClassificationHead(["a", "b"])
    pre = TabularPreprocessor()
    config = {k: v for k, v in model.aggregator_config.items() if k != "attention"}
    meta = {"fold": 0, "aggregator": config, "head": head.state_dict(),
            "preprocessing": pre.state_dict()}  # fmt: skip
    FoldModel(0, model, head, pre, meta).save(tmp_path)
    loaded = FoldModel.load(tmp_path)
    assert loaded.model.layer1.attention == "exact"
    assert json.loads((tmp_path / "fold.json").read_text())["aggregator"].get("attention") is None
