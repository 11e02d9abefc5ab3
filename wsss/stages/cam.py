"""Stage 2, `wsss cam`: class activation maps of every image's labelled classes
(:func:`wsss.cam.extract.extract_to_folder`).

Output folder ``RUN/cam/`` (also the format of ``RUN/expand/``): ``<id>.npz`` with ``classes`` int16
``(k,)`` class ids (1..K) and ``cam`` float16 ``(k, H, W)`` in [0, 1], max-normalised per class, at the
image's resolution (load with ``np.load(path)``, no pickle). Resumable per file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.cam.extract import extract_to_folder
from wsss.config import Config, config_to_dict
from wsss.engine.core import resolve_device
from wsss.errors import WsssError
from wsss.manifest import StageOutcome
from wsss.models.checkpoint import load_classifier
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import folder_of

log = logging.getLogger(__name__)


def inputs(ctx: StageContext) -> dict[str, str]:
    hint = "no trained classifier in this run directory; run `wsss train-cls CONFIG` first"
    key = ctx.manifest_key("train-cls", hint)
    if not (ctx.folder("train-cls") / "classifier.pt").is_file():
        raise WsssError(hint, ctx.run_dir)
    return {"classifier": key}


def section(cfg: Config) -> dict:
    return config_to_dict(cfg.cam)


def run(ctx: StageContext) -> dict:
    c = ctx.cfg.cam
    device = resolve_device(c.device)
    model, meta = load_classifier(ctx.folder("train-cls") / "classifier.pt", device)
    ds = ctx.select(ctx.split(c.split))
    counts = extract_to_folder(model, ds, c, ctx.out, device, meta["mean"], meta["std"])
    if ctx.shard is not None:
        return counts
    log.info("cam: %d images (%d computed, %d reused), method %s, %d scales%s -> %s", counts["images"], counts["computed"],
             counts["reused"], c.method, len(c.scales), " + flip" if c.flip else "", ctx.out)
    warnings = []
    if counts["computed"] and counts["empty"] == counts["computed"]:
        warnings.append(f"every map of the {counts['computed']} images is zero: the classifier finds none of the labelled "
                        "classes, so the pseudo-masks will be all background (check train-cls's loss and val mAP in cls/log.csv)")
        log.warning("cam: %s", warnings[-1])
    return {"format": "npz: classes int16 (k,), cam float16 (k,H,W)", **counts, "shards": ctx.shards, "warnings": warnings}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    return f"cam: {'up to date' if outcome.skipped else 'done'}; {outcome.manifest['outputs']['images']} images -> {folder_of(cfg, run_dir, 'cam')}"
