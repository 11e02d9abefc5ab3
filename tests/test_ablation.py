"""Unit tests of the ablation flow's pieces (the flow itself runs in tests/test_e2e_synthetic.py)."""

from __future__ import annotations

import pytest

from wsss.pipelines.ablation import combined_variant, render_table, variant_methods
from wsss.config import load_config
from wsss.errors import ConfigError, WsssError


def _row(name: str, miou: float) -> dict:
    return {"variant": name, "mIoU": miou, "threshold": 0.3, "fg_precision": 50.0, "fg_recall": 60.0,
            "confidence_mIoU": miou + 20, "confidence_kept": 55.0, "confidence_mIoU_ign_bg": miou + 10, "finetune_s": 1.0, "extract_s": 2.0}


def test_variant_names_are_checked_against_the_registry():
    assert variant_methods("hide_and_seek+acol") == ["hide_and_seek", "acol"]
    with pytest.raises(ConfigError, match="empty method name"):
        variant_methods("acol+")
    cfg = load_config(None, ["ablation.variants=[plain, hide_and_sek]"])
    from wsss.pipelines import ablation

    with pytest.raises(WsssError, match="hide_and_sek.*hide_and_seek"):
        ablation.run(cfg)  # fails before any stage runs


def test_best_two_single_methods_are_combined_once():
    cfg = load_config(None, ["ablation.variants=[plain, erasing, acol, mixup]"])
    rows = [_row("plain", 45), _row("erasing", 38), _row("acol", 41), _row("mixup", 42)]
    assert combined_variant(cfg, rows[:2]) is None  # singles not all scored yet
    assert combined_variant(cfg, rows) == "acol+mixup"  # plain is the control, not a method
    off = load_config(None, ["ablation.variants=[acol, mixup]", "ablation.combine_best=false"])
    assert combined_variant(off, rows) is None
    given = load_config(None, ["ablation.variants=[acol, mixup, acol+mixup]"])
    assert combined_variant(given, rows) is None  # configured anyway: not run twice


def test_table_has_a_column_per_crf_mode_and_deltas():
    md = render_table([_row("CAM (stage 2)", 40.0), _row("acol", 41.25)], ["confidence"])
    lines = md.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 12
    assert "confidence CRF mIoU, ignored as bg" in lines[0]
    assert "| acol | 41.2 | +1.2 | 0.30 | 50.0 | 60.0 | 61.2 | 55.0 | 51.2 | 1 | 2 |" in md
    assert "| CAM (stage 2) | 40.0 | +0.0 |" in md
    old = {k: v for k, v in _row("erasing", 39.0).items() if k != "confidence_mIoU_ign_bg"}  # a row from before the column
    assert "| erasing | 39.0 | -1.0 | 0.30 | 50.0 | 60.0 | 59.0 | 55.0 |  | 1 | 2 |" in render_table([_row("CAM (stage 2)", 40.0), old], ["confidence"])


def test_best_pair_skips_methods_that_each_bring_a_head():
    cfg = load_config(None, ["ablation.variants=[acol, recam, mixup]"])
    rows = [{"variant": "acol", "mIoU": 50.0}, {"variant": "recam", "mIoU": 49.0}, {"variant": "mixup", "mIoU": 30.0}]
    assert combined_variant(cfg, rows) == "acol+mixup"
