"""Tissue detection: ground truth IoU, ink, borders, faint tissue, debris, kernels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from wsi_mil.tiling.tissue import (
    TissueParams,
    _fill_small_holes,
    _remove_small,
    _square_filter,
    detect_tissue,
    label_components,
    otsu_threshold,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _truth_at(truth: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth (at 4 µm/px) block-averaged by k and cropped to ``shape``."""
    h, w = truth.shape
    t = truth[: h // k * k, : w // k * k].reshape(h // k, k, w // k, k).mean(axis=(1, 3)) >= 0.5
    out = np.zeros(shape, bool)
    rows, cols = min(shape[0], t.shape[0]), min(shape[1], t.shape[1])
    out[:rows, :cols] = t[:rows, :cols]
    return out


@pytest.mark.parametrize("mask_mpp", [4.0, 8.0, 16.0])
@pytest.mark.parametrize("which", ["slide_050", "slide_025"])
def test_iou_against_ground_truth(which: str, mask_mpp: float, request) -> None:
    from wsi_mil.wsi import open_slide

    syn = request.getfixturevalue(which)
    with open_slide(syn.path) as slide:
        thumb = slide.get_thumbnail(mpp=mask_mpp)
    mask = detect_tissue(thumb, mask_mpp)
    truth = _truth_at(syn.tissue_mask, int(mask_mpp / syn.mask_mpp), mask.shape)
    assert mask.shape == thumb.shape[:2]
    assert _iou(mask, truth) >= 0.9


@pytest.fixture(scope="module")
def thumb_and_truth(slide_050):
    from wsi_mil.wsi import open_slide

    with open_slide(slide_050.path) as slide:
        thumb = slide.get_thumbnail(mpp=8.0)
    return thumb, _truth_at(slide_050.tissue_mask, 2, thumb.shape[:2])


def test_ink_and_black_border_are_excluded(thumb_and_truth) -> None:
    thumb, truth = thumb_and_truth
    img = thumb.copy()
    h, w = truth.shape
    ink = np.zeros_like(truth)
    ink[h // 3 : h // 3 + 4, w // 8 : w - w // 8] = True  # green stroke across everything
    img[ink] = (40, 150, 90)
    blue = np.zeros_like(truth)
    blue[h // 2 : h // 2 + 4, w // 8 : w - w // 8] = True
    img[blue] = (35, 45, 170)
    black_pen = np.zeros_like(truth)
    black_pen[2 * h // 3 : 2 * h // 3 + 4, w // 8 : w - w // 8] = True
    img[black_pen] = (32, 30, 36)
    img[:, :6] = 5  # scanner border on the left
    img[-5:] = (20, 20, 20)  # and at the bottom
    mask = detect_tissue(img, 8.0)
    for marks in (ink, blue, black_pen):
        assert not (mask & marks).any()
    assert not mask[:, :6].any() and not mask[-5:].any()
    clean = truth & ~ink & ~blue & ~black_pen
    clean[:, :6] = False
    clean[-5:] = False
    assert _iou(mask, clean) >= 0.85


@pytest.mark.parametrize("background", [(243, 242, 240), (205, 205, 207), (150, 150, 152)])
def test_no_tissue_on_plain_backgrounds(background: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    img = np.clip(np.array(background) + rng.normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(img, 8.0).any()


def test_tissue_on_grey_background(thumb_and_truth) -> None:
    thumb, truth = thumb_and_truth
    img = thumb.copy()
    img[~truth] = (200, 200, 202)  # grey scanner background
    assert _iou(detect_tissue(img, 8.0), truth) >= 0.9


def test_faint_tissue_is_found(thumb_and_truth) -> None:
    thumb, truth = thumb_and_truth
    bg = np.array([241.0, 240.0, 238.0])
    faint = (bg + 0.4 * (thumb.astype(float) - bg)).astype(np.uint8)  # washed-out stain
    assert _iou(detect_tissue(faint, 8.0), truth) >= 0.85


def test_small_debris_removed_by_physical_area() -> None:
    img = np.full((200, 200, 3), 240, np.uint8)
    img[50:150, 50:150] = (200, 120, 180)  # 100x100 px tissue
    img[10:13, 180:183] = (90, 40, 120)  # 3x3 px speck
    at8 = detect_tissue(img, 8.0)  # speck 576 µm² < 20,000 µm²: removed
    assert at8[50:150, 50:150].all() and not at8[10:13, 180:183].any()
    # at 100 µm/px the (blurred) speck covers at most 5x5 px = 250,000 µm²
    at100 = detect_tissue(img, 100.0, min_area_um2=300_000.0)
    assert not at100[10:13, 180:183].any() and at100[50:150, 50:150].all()
    keep = detect_tissue(img, 100.0, min_area_um2=50_000.0, close_um=0.0)
    assert keep[10:13, 180:183].all()


def test_holes_small_filled_large_kept() -> None:
    img = np.full((200, 200, 3), 240, np.uint8)
    img[20:180, 20:180] = (200, 120, 180)
    img[40:43, 40:43] = 240  # 3x3 px hole: filled
    img[80:140, 80:140] = 240  # 60x60 px hole = 230,400 µm² at 8 µm/px: kept
    mask = detect_tissue(img, 8.0)
    assert mask[40:43, 40:43].all()
    assert not mask[85:135, 85:135].any()


def test_deterministic_and_layout_independent(thumb_and_truth) -> None:
    thumb, _ = thumb_and_truth
    a = detect_tissue(thumb, 8.0)
    b = detect_tissue(np.asfortranarray(thumb), 8.0)
    c = detect_tissue(np.dstack([thumb, np.full(thumb.shape[:2], 255, np.uint8)]), 8.0)  # RGBA
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="RGB"):
        detect_tissue(np.zeros((10, 10), np.uint8), 8.0)
    with pytest.raises(ValueError, match="mpp"):
        detect_tissue(np.zeros((10, 10, 3), np.uint8), 0.0)
    with pytest.raises(TypeError):
        detect_tissue(np.zeros((10, 10, 3), np.uint8), 8.0, no_such_param=1)
    assert detect_tissue(np.zeros((0, 5, 3), np.uint8), 8.0).shape == (0, 5)


def test_params_roundtrip() -> None:
    p = TissueParams(sat_floor=0.1)
    assert TissueParams(**p.to_dict()) == p


def test_otsu_on_bimodal() -> None:
    values = np.concatenate([np.full(500, 20), np.full(500, 200)]).astype(np.uint8).reshape(10, 100)
    t = otsu_threshold(values)
    assert 20 < t <= 200
    assert otsu_threshold(values, np.ones(values.shape, bool)) == 256


@pytest.mark.parametrize("seed", range(5))
def test_labels_match_scipy(seed: int) -> None:
    mask = np.random.default_rng(seed).random((60, 70)) < 0.45
    for eight in (True, False):
        ours, areas = label_components(mask, eight)
        structure = np.ones((3, 3)) if eight else None
        ref, n = ndimage.label(mask, structure=structure)
        assert ours.max() == n == len(areas) - 1
        assert np.array_equal(ours > 0, mask)
        # same partition: a bijection between our labels and scipy's
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist(), strict=True))
        assert len(pairs) == n
        assert np.array_equal(np.bincount(ours.ravel())[1:], areas[1:])


@pytest.mark.parametrize("seed", range(3))
def test_morphology_matches_scipy(seed: int) -> None:
    mask = np.random.default_rng(seed).random((50, 40)) < 0.3
    for r in (1, 2):
        k = np.ones((2 * r + 1, 2 * r + 1), bool)
        assert np.array_equal(_square_filter(mask, r, False), ndimage.binary_dilation(mask, k))
        ref = ndimage.binary_erosion(np.pad(mask, r, constant_values=True), k)[r:-r, r:-r]
        assert np.array_equal(_square_filter(mask, r, True), ref)
    filled = _fill_small_holes(mask, 10**6)
    assert np.array_equal(filled, ndimage.binary_fill_holes(mask))  # 4-connected background
    labels, _ = ndimage.label(mask, np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    ref_keep = (sizes >= 4)[labels] & mask
    assert np.array_equal(_remove_small(mask, 4), ref_keep)


@pytest.mark.real_slide
def test_real_slide_green_ink_is_not_tissue(real_slide) -> None:
    from wsi_mil.wsi import open_slide

    with open_slide(real_slide) as slide:
        for mpp in (4.0, 8.0):
            thumb = slide.get_thumbnail(mpp=mpp)
            mask = detect_tissue(thumb, mpp)
            rgb = thumb.astype(int)
            green = (rgb[..., 1] > rgb[..., 0] + 25) & (rgb.max(-1) - rgb.min(-1) > 40)
            h, w = mask.shape
            right_or_top = np.zeros_like(mask)
            right_or_top[:, w // 2 :] = True
            right_or_top[: h // 4] = True
            assert (green & right_or_top).sum() >= 10  # the marks are there
            assert not (mask & green).any()
            assert 0.25 < mask.mean() < 0.6  # and the tissue is found
            # the thin strand reaching out to the left is kept along its whole length
            band = (slice(int(0.3 * h), int(0.45 * h)), slice(0, w // 5))
            sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1)
            stained = (sat[band] > 0.2).any(axis=0)
            assert stained.sum() >= 15
            assert mask[band].any(axis=0)[stained].mean() > 0.9
