"""Contract tests for every registered MIL aggregator (``wsi_mil.mil.models``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil.models import (
    MILOutput,
    aggregator_info,
    create_aggregator,
    list_aggregators,
    masked_softmax,
)
from wsi_mil.mil.models.base import attention_pool

IN_DIM = 12
N_OMICS = 7
N_CLINICAL = 3
# small, CPU-fast settings per aggregator; unknown (third-party) names use defaults
SMALL: dict[str, dict[str, Any]] = {
    "mean": {"hidden_dim": 16},
    "max": {"hidden_dim": 16},
    "abmil": {"hidden_dim": 16, "attn_dim": 8},
    "clam_sb": {"hidden_dim": 16, "attn_dim": 8, "k_sample": 2},
    # 4 landmarks: bags of more than 4 tokens take the Nyström path, smaller ones exact
    "transmil": {"hidden_dim": 16, "n_heads": 2, "landmarks": 4},
    "dual_xattn": {
        "omics_groups": [[0, 1], [2, 3, 4], [5, 6]],
        "n_clinical": N_CLINICAL,
        "dim": 16,
        "n_heads": 2,
        "histology_dim": 16,
    },
}
NAMES = list_aggregators()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, n_outputs: int = 3, seed: int = 0, **extra: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_aggregator(name, IN_DIM, n_outputs, **{**SMALL.get(name, {}), **extra})
    if name == "dual_xattn":  # as after training: the fused classifier has left zero
        torch.nn.init.normal_(model.classifier.weight, std=0.5)
    return model


def make_inputs(
    batch: int = 3, n_tiles: int = 9, seed: int = 1, lengths: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Random padded batch; bag ``b`` has ``lengths[b]`` real tiles at the front."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [n_tiles] * batch
    mask = torch.arange(n_tiles)[None, :] < torch.tensor(lengths)[:, None]
    return {
        "features": torch.randn(batch, n_tiles, IN_DIM, generator=g),
        "mask": mask,
        "omics": torch.randn(batch, N_OMICS, generator=g),
        "clinical": torch.randn(batch, N_CLINICAL, generator=g),
        "omics_mask": torch.ones(batch, dtype=torch.bool),
        "clinical_mask": torch.ones(batch, dtype=torch.bool),
        "labels": torch.arange(batch) % 3,
    }


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> MILOutput:
    kw = dict(inputs)
    return model(kw.pop("features"), kw.pop("mask"), **kw)


def take(inputs: dict[str, torch.Tensor], b: int, n: int | None = None) -> dict[str, torch.Tensor]:
    """Bag ``b`` alone, cropped to its first ``n`` tiles."""
    out = {k: v[b : b + 1] for k, v in inputs.items()}
    if n is not None:
        out["features"] = out["features"][:, :n]
        out["mask"] = out["mask"][:, :n]
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_all_builtins() -> None:
    assert {"mean", "max", "abmil", "clam_sb", "transmil", "dual_xattn"} <= set(NAMES)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="abmil") as err:
        create_aggregator("abmill", IN_DIM, 2)
    assert "abmill" in str(err.value)


def test_unknown_option_is_config_error() -> None:
    with pytest.raises(ConfigError, match="hidden_dim"):
        create_aggregator("abmil", IN_DIM, 2, hiden_dim=8)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_dims_rejected(bad: Any) -> None:
    with pytest.raises(ConfigError, match="in_dim"):
        create_aggregator("mean", bad, 2)


def test_wrong_feature_dim_names_both_dims() -> None:
    model = build("abmil")
    with pytest.raises(ConfigError, match=f"in_dim={IN_DIM}"):
        model(torch.randn(1, 4, IN_DIM + 1), torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("features", "mask", "match"),
    [
        (torch.randn(4, IN_DIM), None, r"\(B, N, D\)"),
        (torch.randn(2, 0, IN_DIM), None, "no tiles"),
        (torch.randn(2, 4, IN_DIM), torch.ones(2, 5, dtype=torch.bool), "mask must be"),
        (torch.randn(2, 4, IN_DIM), torch.ones(2, 4), "bool"),
    ],
)
def test_bad_bag_inputs(features: torch.Tensor, mask: torch.Tensor | None, match: str) -> None:
    for name in NAMES:
        with pytest.raises(ConfigError, match=match):
            build(name)(features, mask)


@pytest.mark.parametrize("name", NAMES)
def test_metadata(name: str) -> None:
    info = aggregator_info(name)
    assert info.description
    assert "histology" in info.modalities
    model = build(name)
    assert model.aggregator_config["name"] == name
    assert model.aggregator_config["in_dim"] == IN_DIM


def test_transmil_declared_order_dependent() -> None:
    assert aggregator_info("transmil").permutation_invariant is False
    assert set(aggregator_info("dual_xattn").modalities) == {"histology", "omics", "clinical"}


def test_masked_softmax_all_masked_row_is_zero() -> None:
    scores = torch.randn(2, 5)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    w = masked_softmax(scores, mask)
    assert torch.all(w[~mask] == 0)
    assert close(w[0].sum(), torch.tensor(1.0))
    assert torch.all(w[1] == 0) and not torch.isnan(w).any()


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_outputs", [3, 1])
def test_output_shapes(name: str, n_outputs: int) -> None:
    model = build(name, n_outputs=n_outputs).eval()
    inputs = make_inputs(lengths=[9, 5, 2])
    if n_outputs == 1:
        inputs["labels"] = torch.tensor([0, 1, 1])
    out = run(model, inputs)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (3, n_outputs)
    assert torch.isfinite(out.logits).all()
    if aggregator_info(name).has_attention:
        assert out.attention is not None and out.attention.shape == (3, 9)
    else:
        assert out.attention is None
    if out.aux_loss is not None:
        assert out.aux_loss.ndim == 0


@pytest.mark.parametrize("name", NAMES)
def test_attention_zero_on_padding_and_sums_to_one(name: str) -> None:
    if not aggregator_info(name).has_attention:
        pytest.skip("no attention")
    model = build(name).eval()
    inputs = make_inputs(lengths=[9, 4, 1])
    attn = run(model, inputs).attention
    assert attn is not None
    assert torch.all(attn[~inputs["mask"]] == 0)
    assert torch.all(attn >= 0)
    assert close(attn.sum(dim=1), torch.ones(3))


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_each_bag_alone(name: str) -> None:
    model = build(name).eval()
    lengths = [9, 6, 1]
    inputs = make_inputs(lengths=lengths)
    # garbage in padded rows must not matter
    inputs["features"][~inputs["mask"]] = 1e4
    batched = run(model, inputs)
    for b, n in enumerate(lengths):
        alone = run(model, take(inputs, b, n))
        assert close(batched.logits[b : b + 1], alone.logits), (name, b)
        if batched.attention is not None:
            assert close(batched.attention[b : b + 1, :n], alone.attention), (name, b)


@pytest.mark.parametrize("name", NAMES)
def test_padding_position_does_not_matter(name: str) -> None:
    """Padding interleaved with the tiles gives the same result as padding at the end."""
    model = build(name).eval()
    inputs = make_inputs(batch=1, n_tiles=6, lengths=[6])
    interleaved = dict(inputs)
    feats = torch.full((1, 10, IN_DIM), -3.0)
    keep = torch.tensor([0, 2, 3, 5, 8, 9])
    feats[0, keep] = inputs["features"][0]
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, keep] = True
    interleaved["features"], interleaved["mask"] = feats, mask
    a, b = run(model, inputs), run(model, interleaved)
    assert close(a.logits, b.logits)
    if a.attention is not None:
        assert close(a.attention, b.attention[:, keep])


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance_where_claimed(name: str) -> None:
    model = build(name).eval()
    inputs = make_inputs(batch=2, lengths=[9, 7])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    permuted = dict(inputs, features=inputs["features"][:, perm], mask=inputs["mask"][:, perm])
    a, b = run(model, inputs), run(model, permuted)
    if aggregator_info(name).permutation_invariant:
        assert close(a.logits, b.logits)
        if a.attention is not None:
            assert close(a.attention[:, perm], b.attention)
    else:
        # the claim "not invariant" must be true too (TransMIL's positional conv)
        assert not close(a.logits, b.logits)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_and_padding_gets_none(name: str) -> None:
    model = build(name).train()
    inputs = make_inputs(lengths=[9, 5, 3])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    inputs["clinical_mask"] = torch.tensor([True, True, False])
    inputs["features"].requires_grad_(True)
    out = run(model, inputs)
    loss = out.logits.pow(2).sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    grad = inputs["features"].grad
    assert grad is not None
    assert torch.all(grad[~inputs["mask"]] == 0)
    assert grad[inputs["mask"]].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_in_eval(name: str) -> None:
    model = build(name).eval()
    inputs = make_inputs(lengths=[9, 5, 2])
    a, b = run(model, inputs), run(model, inputs)
    assert torch.equal(a.logits, b.logits)
    if a.attention is not None:
        assert torch.equal(a.attention, b.attention)


@pytest.mark.parametrize("name", NAMES)
def test_empty_bag_does_not_poison_batch(name: str) -> None:
    model = build(name).eval()
    inputs = make_inputs(lengths=[9, 0, 4])
    out = run(model, inputs)
    assert torch.isfinite(out.logits).all()
    alone = run(model, take(inputs, 0))
    assert close(out.logits[:1], alone.logits)
    if out.attention is not None:
        assert torch.all(out.attention[1] == 0)


# ----------------------------------------------------------------------------- learning


def planted_bags(
    n_bags: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags of 20-40 noise tiles; positive bags hold 3 tiles shifted along one direction.

    Returns:
        ``(features (B, 40, D), mask (B, 40), labels (B,), planted (B, 40) bool)``.
    """
    g = torch.Generator().manual_seed(seed)
    n_max = 40
    lengths = torch.randint(20, n_max + 1, (n_bags,), generator=g)
    mask = torch.arange(n_max)[None, :] < lengths[:, None]
    features = torch.randn(n_bags, n_max, IN_DIM, generator=g)
    labels = torch.arange(n_bags) % 2
    planted = torch.zeros(n_bags, n_max, dtype=torch.bool)
    signal = torch.zeros(IN_DIM)
    signal[:3] = 2.5
    for b in torch.nonzero(labels).flatten().tolist():
        idx = torch.randperm(int(lengths[b]), generator=g)[:3]
        planted[b, idx] = True
        features[b, idx] += signal
    return features, mask, labels, planted


def test_abmil_learns_planted_signal_and_attends_to_it() -> None:
    torch.manual_seed(0)
    model = create_aggregator("abmil", IN_DIM, 2, hidden_dim=32, attn_dim=16, dropout=0.0)
    x, mask, y, _ = planted_bags(128, seed=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, mask).logits, y)
        loss.backward()
        opt.step()
    model.eval()
    xt, mt, yt, planted = planted_bags(64, seed=11)
    with torch.no_grad():
        out = model(xt, mt)
    accuracy = (out.logits.argmax(1) == yt).float().mean().item()
    assert accuracy >= 0.9
    assert out.attention is not None
    pos = yt == 1
    top = out.attention[pos].argmax(dim=1)
    hit = planted[pos].gather(1, top[:, None]).float().mean().item()
    assert hit >= 0.9
    # the planted tiles carry most of the attention mass of positive bags
    assert (out.attention[pos] * planted[pos]).sum(1).mean() > 0.5


# ----------------------------------------------------------------------------- abmil


def test_abmil_multi_branch_class_attention() -> None:
    model = build("abmil", multi_branch=True).eval()
    inputs = make_inputs(lengths=[9, 4, 2])
    out = run(model, inputs)
    per_class = model.class_attention(inputs["features"], inputs["mask"])
    assert per_class is not None and per_class.shape == (3, 3, 9)
    assert close(per_class.sum(-1), torch.ones(3, 3))
    assert torch.all(per_class[~inputs["mask"][:, None, :].expand(-1, 3, -1)] == 0)
    assert close(per_class.mean(1), out.attention)
    assert build("abmil").class_attention(inputs["features"], inputs["mask"]) is None


# ----------------------------------------------------------------------------- clam_sb


def test_clam_aux_loss_only_with_labels() -> None:
    model = build("clam_sb").train()
    inputs = make_inputs(lengths=[9, 5, 3])
    out = run(model, inputs)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.aux_loss.backward()
    assert model.instance_classifiers.weight.grad is not None
    assert model.instance_classifiers.weight.grad.abs().sum() > 0
    inputs["labels"] = None  # type: ignore[assignment]
    assert run(model, inputs).aux_loss is None


@pytest.mark.parametrize("options", [{"instance_loss": "ce"}, {"subtyping": True}])
def test_clam_variants_finite(options: dict[str, Any]) -> None:
    out = run(build("clam_sb", **options), make_inputs(lengths=[9, 1, 4]))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def test_clam_instance_loss_rewards_confident_top_tiles() -> None:
    """Top-attended tiles are positives, bottom-attended negatives for the bag's class."""
    model = build("clam_sb", n_outputs=2, k_sample=2, hidden_dim=4).eval()
    with torch.no_grad():
        model.instance_classifiers.weight.zero_()
        model.instance_classifiers.bias.zero_()
        # classifier of class 1: "positive" logit = 5 * h[..., 0]
        model.instance_classifiers.weight[3, 0] = 5.0
    h = torch.zeros(1, 6, 4)
    h[0, :, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    mask = torch.ones(1, 6, dtype=torch.bool)
    labels = torch.tensor([1])
    agree = torch.tensor([[3.0, 2.0, 0.0, 0.0, -2.0, -3.0]])  # attention ranks h0 high first
    disagree = -agree
    good = model._instance_loss(h, agree, mask, labels)
    bad = model._instance_loss(h, disagree, mask, labels)
    assert good < 0.1 < bad


def test_clam_bad_labels_are_config_errors() -> None:
    model = build("clam_sb")
    inputs = make_inputs()
    inputs["labels"] = torch.tensor([0, 1, 5])
    with pytest.raises(ConfigError, match="n_classes"):
        run(model, inputs)
    with pytest.raises(ConfigError, match="instance_loss"):
        build("clam_sb", instance_loss="hinge")


def test_smooth_svm_loss_values() -> None:
    from wsi_mil.mil.models.clam import smooth_svm_loss

    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    target = torch.tensor([0, 0])
    loss = smooth_svm_loss(logits, target, tau=1.0)
    expected = (
        torch.log(1 + torch.e * torch.ones(())) + torch.log1p(torch.exp(torch.tensor(-9.0)))
    ) / 2
    assert close(loss, expected)
    # small tau approaches the hinge loss max(0, 1 + s_wrong - s_true)
    hinge = smooth_svm_loss(torch.tensor([[0.2, 0.5]]), torch.tensor([0]), tau=1e-3)
    assert close(hinge, torch.tensor(1.3))


# ----------------------------------------------------------------------------- transmil


def test_transmil_grid_layout_repeats_first_tiles() -> None:
    from wsi_mil.mil.models.transmil import TransMIL

    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, [1, 2, 4, 5, 6]] = True  # 5 real tiles -> 3 x 3 grid
    mask[1, :2] = True  # 2 real tiles -> 2 x 2 grid inside the 3 x 3
    index, valid, side = TransMIL._grid_layout(mask)
    assert side == 3
    assert index[0].tolist() == [1, 2, 4, 5, 6, 1, 2, 4, 5]
    assert valid[0].all()
    assert valid[1].tolist() == [True, True, False, True, True, False, False, False, False]
    assert index[1][valid[1]].tolist() == [0, 1, 0, 1]


def test_transmil_attention_averages_the_cells_of_a_repeated_tile() -> None:
    from wsi_mil.mil.models.transmil import TransMIL

    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, [0, 2, 3, 5]] = True  # 4 real tiles -> 2 x 2 grid, no repeats
    index, valid, _ = TransMIL._grid_layout(mask)
    cells = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    got = TransMIL._per_tile(cells, index, valid, mask)
    assert torch.allclose(got, torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.0, 0.4]]))
    # 3 real tiles fill a 2 x 2 grid: tile 0 shows twice and gets its cells' mean
    mask = torch.tensor([[True, True, True]])
    index, valid, _ = TransMIL._grid_layout(mask)
    got = TransMIL._per_tile(torch.tensor([[0.1, 0.2, 0.3, 0.5]]), index, valid, mask)
    expected = torch.tensor([0.3, 0.2, 0.3])  # (0.1 + 0.5) / 2, 0.2, 0.3
    assert torch.allclose(got[0], expected / expected.sum())


def test_transmil_heads_must_divide_dim() -> None:
    with pytest.raises(ConfigError, match="n_heads"):
        create_aggregator("transmil", IN_DIM, 2, hidden_dim=10, n_heads=4)


# ----------------------------------------------------------------------------- dual_xattn


def test_dual_xattn_masked_modality_values_are_never_read() -> None:
    model = build("dual_xattn").eval()
    inputs = make_inputs(lengths=[9, 6, 4])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    inputs["clinical_mask"] = torch.tensor([False, True, True])
    base = run(model, inputs)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["omics"][1] = torch.tensor(float("nan"))
    changed["clinical"][0] = 1e6
    out = run(model, changed)
    assert torch.equal(base.logits, out.logits)
    assert torch.equal(base.attention, out.attention)


def test_dual_xattn_missing_is_not_zero_filling() -> None:
    model = build("dual_xattn").eval()
    inputs = make_inputs(batch=1)
    inputs["omics"] = torch.zeros(1, N_OMICS)
    zero_filled = run(model, inputs)
    inputs["omics_mask"] = torch.tensor([False])
    masked = run(model, inputs)
    assert not close(zero_filled.logits, masked.logits)
    # omics=None means "missing for every bag", the same as an all-False mask
    inputs["omics"] = None  # type: ignore[assignment]
    inputs["omics_mask"] = None  # type: ignore[assignment]
    assert close(run(model, inputs).logits, masked.logits)


def test_dual_xattn_uses_present_omics_without_leaking_across_bags() -> None:
    model = build("dual_xattn").eval()
    inputs = make_inputs(lengths=[9, 6, 4])
    base = run(model, inputs)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["omics"][0] += 2.0
    changed["clinical"][0] -= 2.0
    out = run(model, changed)
    assert not close(base.logits[0], out.logits[0])
    assert not close(base.attention[0], out.attention[0])  # tiles attended to omics
    assert torch.equal(base.logits[1:], out.logits[1:])


def test_cross_attention_without_keys_leaves_queries_alone() -> None:
    from wsi_mil.mil.models.dual_xattn import CrossAttention

    attn = CrossAttention(8, 2, 0.0)
    out, weights = attn(
        torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.tensor([[False] * 3, [True] * 3])
    )
    assert torch.all(out[0] == 0) and out[1].abs().sum() > 0
    assert torch.all(weights[0] == 0) and torch.allclose(weights[1].sum(-1), torch.ones(5))


@pytest.mark.parametrize(
    "options",
    [
        {"omics_groups": None, "n_clinical": N_CLINICAL},
        {"omics_groups": [[0, 1, 2], [3, 4, 5, 6]], "n_clinical": 0},
    ],
)
def test_dual_xattn_single_extra_modality(options: dict[str, Any]) -> None:
    model = build("dual_xattn", **options).train()
    inputs = make_inputs(lengths=[9, 6, 4])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    inputs["clinical_mask"] = torch.tensor([False, True, True])
    out = run(model, inputs)
    assert out.logits.shape == (3, 3)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"omics_groups": None, "n_clinical": 0}, "abmil"),
        ({"omics_groups": [[0], []]}, r"omics_groups\[1\]"),
        ({"omics_groups": [[0, -1]]}, "non-negative"),
        ({"dim": 10, "n_heads": 4}, "n_heads"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_dual_xattn_bad_config(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build("dual_xattn", **options)


def test_dual_xattn_bad_inputs() -> None:
    model = build("dual_xattn")
    inputs = make_inputs()
    inputs["omics"] = inputs["omics"][:, :4]
    with pytest.raises(ConfigError, match="omics"):
        run(model, inputs)
    inputs = make_inputs()
    inputs["clinical"] = inputs["clinical"][:, :2]
    with pytest.raises(ConfigError, match="n_clinical=3"):
        run(model, inputs)


def test_dual_xattn_memory_is_linear_in_tiles() -> None:
    """20,000 tiles: no tensor saved for backward is anywhere near N x N."""
    n_tiles = 20_000
    model = build("dual_xattn", dim=16, n_heads=2).train()
    inputs = make_inputs(batch=1, n_tiles=n_tiles)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(model, inputs)
    out.logits.sum().backward()
    assert out.attention is not None and out.attention.shape == (1, n_tiles)
    assert largest >= n_tiles  # the hook saw the tile tensors
    assert largest <= 64 * n_tiles  # N x N would be 20,000 x larger


@pytest.mark.parametrize("name", NAMES)
def test_runs_under_autocast(name: str) -> None:
    """Mixed precision (CPU bfloat16 here, as the trainer uses autocast on CUDA)."""
    model = build(name).train()
    inputs = make_inputs(lengths=[9, 5, 3])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inputs)
        loss = out.logits.float().pow(2).sum()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
    loss.backward()
    assert torch.isfinite(out.logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if out.attention is not None:
        assert torch.all(out.attention[~inputs["mask"]] == 0)
        assert torch.allclose(out.attention.float().sum(1), torch.ones(3), atol=2e-2)


def test_dual_xattn_learns_label_carried_by_one_omics_group() -> None:
    def data(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = make_inputs(batch=n, n_tiles=30, seed=seed)
        return inputs, (inputs["omics"][:, 2:5].sum(1) > 0).long()

    torch.manual_seed(0)
    model = build("dual_xattn", n_outputs=2, dropout=0.0)
    train, y = data(128, seed=20)
    train.pop("labels")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(run(model, train).logits, y).backward()
        opt.step()
    test, yt = data(64, seed=21)
    with torch.no_grad():
        accuracy = (run(model.eval(), test).logits.argmax(1) == yt).float().mean()
    assert accuracy >= 0.85


def test_dual_xattn_modality_dropout_masks_whole_bags_in_training_only() -> None:
    """In training each bag's omics are dropped as a missing modality (its context
    weights on the omics tokens are 0); in eval nothing is dropped."""
    model = build("dual_xattn", modality_dropout=0.5)
    inputs = make_inputs(batch=64, n_tiles=5)
    torch.manual_seed(0)
    weights = run(model.train(), inputs).context_weights
    assert weights is not None
    dropped = weights[:, :3].sum(1) == 0  # 3 omics groups, then the clinical token
    assert 10 < int(dropped.sum()) < 54
    eval_weights = run(model.eval(), inputs).context_weights
    assert eval_weights is not None and torch.all(eval_weights[:, :3].sum(1) > 0)


def test_dual_xattn_residual_histology_path_is_added_to_the_fused_logits() -> None:
    """With the fused head zeroed, the logits are the histology path's alone, and they do
    not depend on the omics."""
    model = build("dual_xattn").eval()
    assert build("dual_xattn", residual=False).histology_head is None
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    inputs = make_inputs(lengths=[9, 6, 4])
    base = run(model, inputs)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["omics"] += 3.0
    assert torch.allclose(base.logits, run(model, changed).logits)
    assert base.logits.abs().sum() > 0


def test_dual_xattn_without_any_context_is_its_histology_path() -> None:
    """``histology_fallback``: a bag with neither omics nor clinical gets the histology
    path's logits alone; a bag with context gets the fused correction on top (with the
    fused classifier no longer at its zero start)."""
    model = build("dual_xattn", n_outputs=1).eval()
    inputs = make_inputs(lengths=[9, 6, 4])
    inputs["omics_mask"] = torch.tensor([False, True, False])
    inputs["clinical_mask"] = torch.tensor([False, False, True])
    out = run(model, inputs)
    no_context = take(inputs, 0)
    alone = build("dual_xattn", n_outputs=1, histology_fallback=False).eval()
    alone.load_state_dict(model.state_dict())
    tiles = model.histology_proj(no_context["features"])
    pooled = attention_pool(tiles, model.histology_pool(tiles), no_context["mask"])[0]
    hist = model.histology_head(pooled[:, 0])
    assert torch.allclose(out.logits[0], hist[0], atol=1e-6)
    assert not torch.allclose(run(alone, no_context).logits, hist, atol=1e-4)
    with_context = build("dual_xattn", n_outputs=1, histology_fallback=False).eval()
    with_context.load_state_dict(model.state_dict())
    assert torch.allclose(out.logits[1:], run(with_context, inputs).logits[1:], atol=1e-6)
    assert not build("dual_xattn", residual=False).histology_fallback


def test_dual_xattn_warm_start_stages() -> None:
    """Stage "histology": only the histology path trains and the logits are its own;
    stage "context": only the context linear path trains, and the logits are the
    histology path's plus its own (its own alone with ``context_adjust=False``);
    stage "fusion": both are frozen; None: all trainable again."""
    model = build("dual_xattn", n_outputs=1)
    assert model.training_stages == ("histology", "context", "fusion")
    assert build("dual_xattn", context_linear=False).training_stages == ("histology", "fusion")
    assert build("dual_xattn", warm_start=False).training_stages == ()
    assert build("dual_xattn", residual=False).training_stages == ()
    assert build("dual_xattn", histology_dim=None).training_stages == ()
    assert [model.stage_lr_factor(s) for s in model.training_stages] == [1.0, 10.0, 0.1]
    assert build("abmil").stage_lr_factor("anything") == 1.0
    own = {n for n, _ in model.named_parameters() if n.startswith("histology_")}
    assert own and all(n.split(".")[0] in {"histology_proj", "histology_pool",
                                           "histology_head"} for n in own)  # fmt: skip
    inputs = make_inputs(lengths=[9, 6, 4])
    model.eval()
    full = run(model, inputs).logits
    model.set_stage("histology")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == own
    alone = run(model, inputs)
    assert alone.context_attention is None and not torch.allclose(alone.logits, full)
    changed = {**inputs, "omics": inputs["omics"] + 3.0}
    assert torch.equal(run(model, changed).logits, alone.logits)
    model.set_stage("context")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"context_linear.weight"}
    assert torch.equal(run(model, inputs).logits, alone.logits)  # adjusted, from zero
    unadjusted = build("dual_xattn", n_outputs=1, context_adjust=False).eval()
    unadjusted.load_state_dict(model.state_dict())
    unadjusted.set_stage("context")
    assert torch.equal(run(unadjusted, inputs).logits, torch.zeros(3, 1))  # its own
    with torch.no_grad():
        model.context_linear.weight.fill_(0.5)
    shifted = run(model, changed).logits - run(model, inputs).logits
    assert torch.allclose(shifted, torch.full_like(shifted, 0.5 * 3.0 * 3), atol=1e-5)
    with torch.no_grad():
        model.context_linear.weight.zero_()
    model.set_stage("fusion")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & (own | {"context_linear.weight"})
    assert torch.equal(run(model, inputs).logits, full)
    model.set_stage(None)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("omics")
    with pytest.raises(ValueError, match="stage"):
        build("abmil").set_stage("histology")


def test_dual_xattn_context_stage_is_penalised_and_its_design_is_what_the_path_reads() -> None:
    """With ``context_fit="ridge"`` the trainer fits stage "context" from
    :meth:`stage_design`; weights set on that design give the stage's own logits, and
    a masked modality contributes 0."""
    model = build("dual_xattn", n_outputs=1).eval()
    assert model.penalised_stages == ("context",)
    assert build("dual_xattn", context_fit="sgd").penalised_stages == ()
    assert build("dual_xattn", context_linear=False).penalised_stages == ()
    assert build("abmil").penalised_stages == ()
    assert model.stage_l1_ratio("context") == 1.0
    assert build("dual_xattn", context_fit="ridge").stage_l1_ratio("context") == 0.0
    inputs = make_inputs(lengths=[9, 6, 4])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    tabular = {k: v for k, v in inputs.items() if k not in ("features", "mask")}
    x = model.stage_design("context", **tabular)
    assert x.shape == (3, model.n_groups + N_CLINICAL)
    assert torch.all(x[1, : model.n_groups] == 0) and torch.all(x[0] != 0)
    weight = torch.linspace(-1, 1, x.shape[1])[:, None]
    model.set_stage("context")
    offset = run(model, inputs).logits  # the histology path's logits: the fit's offset
    model.set_stage_weight("context", weight)
    assert torch.allclose(run(model, inputs).logits, offset + x @ weight, atol=1e-6)
    with pytest.raises(ValueError, match="penalised stage"):
        build("dual_xattn", context_fit="sgd").stage_design("context", **tabular)
    for method in ("stage_design", "stage_l1_ratio"):
        with pytest.raises(ValueError, match="penalised stage"):
            getattr(build("abmil"), method)("context")
    with pytest.raises(ValueError, match="penalised stage"):
        build("abmil").set_stage_weight("context", weight)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"omics_encoder": "mlp"}, "omics_encoder"),
        ({"context_fit": "group_lasso"}, "context_fit"),
        ({"modality_dropout": 1.0}, "modality_dropout"),
        ({"fusion_lr": 0.0}, "fusion_lr"),
        ({"context_lr": -1.0}, "context_lr"),
    ],
)
def test_dual_xattn_bad_fusion_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build("dual_xattn", **options)


def test_clam_weighs_bag_and_instance_losses_as_published() -> None:
    model = build("clam_sb")
    assert (model.task_weight, model.instance_weight) == (0.7, 0.3)
    assert build("abmil").task_weight == 1.0
    assert build("clam_sb", bag_weight=1.0).aggregator_config["bag_weight"] == 1.0
    with pytest.raises(ConfigError, match="bag_weight"):
        build("clam_sb", bag_weight=0.0)


def test_dual_xattn_context_attention_over_real_tiles_and_present_tokens() -> None:
    model = build("dual_xattn").eval()
    inputs = make_inputs(lengths=[9, 4, 1])
    inputs["omics_mask"] = torch.tensor([True, False, True])
    out = run(model, inputs)
    co, weights = out.context_attention, out.context_weights
    assert co is not None and weights is not None
    assert co.shape == (3, 3 + 1, 9) and weights.shape == (3, 4)  # 3 groups + clinical
    assert torch.all(co[~inputs["mask"][:, None, :].expand_as(co)] == 0)
    assert torch.all(co[1, :3] == 0) and torch.all(weights[1, :3] == 0)  # no omics
    assert torch.allclose(co[0].sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(3), atol=1e-5)
    assert build("abmil")(inputs["features"], inputs["mask"]).context_attention is None
