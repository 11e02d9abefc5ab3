"""The ablation flow: plain CAM vs each expansion variant (and the best combination), each refined by
every configured CRF mode, tabulated.

Built from the public stage functions only: the standard flow brings ``data``, ``train-cls`` and
``cam`` up to date, then for every variant :func:`wsss.expand.rounds.run_expand` fine-tunes the run's
classifier and extracts maps, :func:`wsss.crf.pool.run_crf` makes pseudo-masks, and the maps and
masks are scored against ground truth. Layout::

    RUN/ablation/config.yaml             resolved config of this ablation
    RUN/ablation/<variant>/<id>.npz      expanded maps (stage-2 format); round_<r>/ as in `wsss expand`
    RUN/ablation/<variant>/crf_<mode>/   pseudo-masks of that CRF mode
    RUN/ablation/<variant>/result.json   the variant's row (written last: a finished variant is reused)
    RUN/ablation/cam/                    rows for the stage-2 maps (their CRF masks; the maps stay in RUN/cam)
    RUN/ablation/table.md|csv, ablation.json

Every variant fine-tunes for the same ``expand.epochs`` (per round for erasing) at the same learning
rate on the same images (all of ``cam.split`` unless ``ablation.finetune_all`` is off), so ``plain``
(fine-tuning alone) is the control at equal cost; ``ablation.images`` only limits the images whose maps
are extracted and scored. A killed ablation resumes: finished
variants are reused, an unfinished one continues from its checkpoints and files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.pipelines.standard import run as run_standard
from wsss.config import Config, config_hash, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.errors import ConfigError, DataError
from wsss.expand import create_expand_methods
from wsss.io import read_json, write_json, write_text
from wsss.manifest import prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.crf.pool import crf_jobs, run_crf
from wsss.engine.core import resolve_device, write_log_csv
from wsss.evaluation.cams import evaluate_cam_folder
from wsss.evaluation.masks import evaluate_masks
from wsss.expand.rounds import run_expand
from wsss.pipeline.checks import check_config
from wsss.pipeline.runner import hold_run, open_split
from wsss.pipeline.table import folder_of

log = logging.getLogger(__name__)

BASELINE = "cam"


@dataclass
class AblationResult:
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    best: str = BASELINE


def variant_methods(variant: str) -> list[str]:
    """``"a+b"`` -> ``["a", "b"]`` (the registry checks the names, in :func:`run`)."""
    methods = [m.strip() for m in variant.split("+")]
    if not all(methods):
        raise ConfigError(f"ablation.variants: empty method name in '{variant}'")
    return methods


def ablation_split(cfg: Config, run_dir: Path) -> Dataset:
    """``cam.split``, cut to the first ``ablation.images`` ids; must have ground-truth masks."""
    ds = open_split(run_dir, cfg.cam.split)
    if not ds.has_masks:
        raise DataError(f"the ablation scores against ground truth, and split '{ds.split}' has no masks", ds.root)
    if cfg.ablation.images is not None and cfg.ablation.images < len(ds):
        ds = ds.subset(sorted(s.id for s in ds)[: cfg.ablation.images])
    return ds


def score_row(name: str, cam_dir: Path, out: Path, ds: Dataset, full: Dataset, cfg: Config) -> dict[str, Any]:
    """CAM mIoU at the best threshold with foreground precision/recall, then for each CRF mode (masks in
    ``out/crf_<mode>/``) pseudo-mask mIoU on kept pixels, kept share and mIoU with ignored pixels counted
    as background. ``ds``: the images scored, a part of ``full`` (the split ``cam_dir`` was made for)."""
    sweep = evaluate_cam_folder(cam_dir, ds, cfg.eval.thresholds)
    b = sweep.best_index
    row: dict[str, Any] = {"variant": name, "mIoU": round(100 * sweep.best_miou, 2), "threshold": sweep.best_threshold,
                           "fg_precision": round(100 * float(sweep.precision[b]), 2),
                           "fg_recall": round(100 * float(sweep.recall[b]), 2),
                           "sweep": {"thresholds": [float(t) for t in sweep.thresholds],
                                     "fg_precision": [round(100 * float(v), 2) for v in sweep.precision],
                                     "fg_recall": [round(100 * float(v), 2) for v in sweep.recall]}}
    for mode in cfg.ablation.crf_modes:
        mask_dir = out / f"crf_{mode}"
        mask_dir.mkdir(parents=True, exist_ok=True)
        jobs, _ = crf_jobs(ds, cam_dir, mask_dir, split=full)
        t0 = time.perf_counter()
        run_crf(jobs, cfg.crf.model_copy(update={"mode": mode}), ds.num_classes, desc=f"crf {mode} {name}")
        res = evaluate_masks(mask_dir, ds)
        row[f"{mode}_mIoU"] = res["mIoU"]
        row[f"{mode}_kept"] = res["kept_share"]
        row[f"{mode}_mIoU_ign_bg"] = res["mIoU_ignored_as_bg"]
        row[f"{mode}_s"] = round(time.perf_counter() - t0, 1)
    return row


def combined_variant(cfg: Config, rows: list[dict[str, Any]]) -> str | None:
    """With ``ablation.combine_best``: the two single methods of ``rows`` (the variants' rows; ``plain`` is
    the control, not a method) with the best CAM mIoU, joined; None when off, when fewer than two were run
    or when the combination was configured anyway."""
    singles = [r for r in rows if "+" not in r["variant"] and r["variant"] != "plain"]
    if not cfg.ablation.combine_best or len(singles) < 2:
        return None
    ranked = sorted(singles, key=lambda r: -r["mIoU"])
    best = ranked[0]
    # the best partner that can share a fine-tune with it (two methods that each bring a head cannot)
    for other in ranked[1:]:
        combo = "+".join(sorted([best["variant"], other["variant"]]))
        try:
            create_expand_methods(variant_methods(combo), cfg.expand)
        except ConfigError:
            continue
        return None if combo in cfg.ablation.variants else combo
    return None


def render_table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    base = rows[0]["mIoU"]
    head = ["variant", "CAM mIoU", "Δ vs CAM", "threshold", "fg precision", "fg recall"]
    for m in modes:
        head += [f"{m} CRF mIoU", f"{m} kept %", f"{m} CRF mIoU, ignored as bg"]
    head += ["fine-tuning s", "extraction s"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['mIoU']:.1f}", f"{r['mIoU'] - base:+.1f}", f"{r['threshold']:.2f}",
                 f"{r['fg_precision']:.1f}", f"{r['fg_recall']:.1f}"]
        for m in modes:
            ign = r.get(f"{m}_mIoU_ign_bg")  # rows finished before this column existed lack it
            cells += [f"{r[f'{m}_mIoU']:.1f}", f"{r[f'{m}_kept']:.1f}", "" if ign is None else f"{ign:.1f}"]
        cells += [f"{r['finetune_s']:.0f}", "" if r["extract_s"] is None else f"{r['extract_s']:.0f}"]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def run(cfg: Config, force: bool = False) -> AblationResult:
    """Run the ablation into ``RUN/ablation/`` (``force``: discard earlier ablation results)."""
    for v in cfg.ablation.variants:
        methods = variant_methods(v)
        create_expand_methods(methods, cfg.expand)  # unknown names fail here, before any training
    check_config(cfg)
    with hold_run(cfg.run.out_dir):
        return _run(cfg, force)


def _run(cfg: Config, force: bool) -> AblationResult:
    started = time.time()
    std = run_standard(cfg, to_stage="cam", report=False)
    run_dir = std.run_dir
    out = run_dir / "ablation"
    cls_dir, cam_dir = folder_of(cfg, run_dir, "train-cls"), folder_of(cfg, run_dir, "cam")
    cls_man, cam_man = read_manifest(cls_dir), read_manifest(cam_dir)
    # variants and crf_modes only add rows: changing them keeps the rows already made
    section = {"ablation": {k: v for k, v in config_to_dict(cfg.ablation).items() if k not in ("variants", "crf_modes", "combine_best")},
               "expand": config_to_dict(cfg.expand), "train_cls": config_to_dict(cfg.train_cls), "cam": config_to_dict(cfg.cam),
               "crf": config_to_dict(cfg.crf), "eval": config_to_dict(cfg.eval), "seed": cfg.run.seed}
    chash = config_hash(section)
    inputs = {"classifier": cls_man["key"], "cam": cam_man["key"]}
    prepare_output_folder(out, stage_key("ablation", chash, inputs), force)
    save_config(cfg, out / "config.yaml")
    ds = ablation_split(cfg, run_dir)
    full = open_split(run_dir, cfg.cam.split)
    val = open_split(run_dir, cfg.data.val_split) if cfg.data.val_split else None
    device = resolve_device(cfg.cam.device)
    log.info("ablation: %d images of '%s', variants %s, CRF modes %s -> %s", len(ds), ds.split,
             ", ".join(cfg.ablation.variants), ", ".join(cfg.ablation.crf_modes), out)

    def finished(folder: Path) -> dict[str, Any] | None:
        row = read_json(folder / "result.json") if (folder / "result.json").is_file() else None
        if row is not None and all(f"{m}_mIoU" in row for m in cfg.ablation.crf_modes):
            return row
        return None

    base_dir = out / BASELINE
    row = finished(base_dir)
    if row is None:
        row = {**score_row("CAM (stage 2)", cam_dir, base_dir, ds, full, cfg), "finetune_s": 0.0, "extract_s": None}
        write_json(base_dir / "result.json", row)
    rows = [row]

    def run_variant(variant: str) -> None:
        folder = out / variant
        row = finished(folder)
        if row is None:
            vcfg = cfg.model_copy(update={"expand": cfg.expand.model_copy(update={"methods": variant_methods(variant)})})
            log.info("ablation: variant %s", variant)
            tune = full if cfg.ablation.finetune_all else ds
            rep = run_expand(vcfg, tune, val, cls_dir / "classifier.pt", cam_dir, folder, device, extract=ds)
            row = {**score_row(variant, folder, folder, ds, ds, cfg), "finetune_s": rep["finetune_s"],
                   "extract_s": rep["extract_s"], "rounds": len(rep["rounds"])}
            write_json(folder / "result.json", row)
        rows.append(row)
        log.info("ablation: %s: CAM mIoU %.1f (%+.1f vs CAM), fg precision %.1f, recall %.1f", variant, row["mIoU"],
                 row["mIoU"] - rows[0]["mIoU"], row["fg_precision"], row["fg_recall"])

    for variant in dict.fromkeys(cfg.ablation.variants):
        run_variant(variant)
    if (combo := combined_variant(cfg, rows[1:])) is not None:
        run_variant(combo)
    table = render_table(rows, list(cfg.ablation.crf_modes))
    write_log_csv(out / "table.csv", [{k: v for k, v in r.items() if k != "sweep"} for r in rows])
    write_text(out / "table.md", table)
    best = max(rows, key=lambda r: r["mIoU"])["variant"]
    write_json(out / "ablation.json", {"images": len(ds), "split": ds.split, "rows": rows, "best": best})
    write_manifest(out, "ablation", section, chash, inputs, {"images": len(ds), "variants": [r["variant"] for r in rows], "best": best},
                   started)
    return AblationResult(run_dir, rows, table, best)
