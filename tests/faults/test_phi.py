"""Fault matrix, PHI: nothing of the scanner's identifying metadata (ScanScope ID, the
label and macro images) reaches any output of ``tile`` or ``extract``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.workflows.cli import main
from wsi_mil.wsi.synthetic import make_synthetic_slide


def test_no_scanner_metadata_or_label_in_any_output(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    make_synthetic_slide(slides / "a.svs", 1024, 768, seed=2)  # with label and macro images
    tiles, feats = tmp_path / "tiles", tmp_path / "feats"
    assert main(["tile", str(slides), "--out", str(tiles), "--workers", "1",
                 "--export-coords"]) == 0  # fmt: skip
    assert main(["extract", str(tiles), "--out", str(feats)]) == 0
    outputs = [p for p in [*tiles.rglob("*"), *feats.rglob("*")] if p.is_file()]
    assert len(outputs) > 10
    for path in outputs:
        data = path.read_bytes()
        assert b"ScanScope" not in data and b"WSI-MIL-SYNTHETIC" not in data, path
    from wsi_mil.wsi import open_slide

    with open_slide(slides / "a.svs") as slide:
        label = np.asarray(slide.associated_image("label"))
    assert label.size  # the label exists in the slide but was never written out
