"""Variants of the predict stage scored against ground truth: classifier gates and CRF settings.

Each photo's class probabilities ``(K, H, W)`` (the config's predict scales and flip) are computed once;
every variant then gates them and/or refines them with its own CRF:

* gates (``--classifier``): ``hard T`` keeps background and the classes the classifier scores at or
  above ``T`` (its top class when none is), ``soft A`` weights each class's probability by its score to
  the power ``A``, ``oracle`` keeps the photo's true image-level labels (what a perfect gate could give;
  not available on a user's photos);
* ``--exclusive T``: the predict stage's class exclusion (``predict.exclusive_below: T``), the co-occurrence
  counted on ``--prior-split``'s labels;
* ``--crf-variant KEY=VALUE[,KEY=VALUE]``: the prediction CRF with crf-section fields changed;
* ``none``: the predict stage as the config has it (``--no-crf``: without its CRF).

    python benchmarks/predict_variants.py --data runs/voc6tune --split val \\
        --segmenter runs/tune_s0n_c320/seg/segmenter.pt --classifier runs/cls800/cls/classifier.pt --resize-long 560
    python benchmarks/predict_variants.py --data runs/voc6tune --split val \\
        --segmenter runs/tune_s0n_c320/seg/segmenter.pt --resize-long 560 --crf-variant iterations=10

Score a classifier only on photos it was not trained on (the carved split's scored photos with a
classifier trained on its fitted ones), or the gate looks better than it is. Reads ground truth (a
measurement, not a pipeline step).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import yaml

from wsss.config import CrfConfig, load_config
from wsss.data.dataset import Dataset, load_dataset
from wsss.engine.classifier import predict_scores
from wsss.evaluation.metrics import confusion, iou_from_confusion
from wsss.inference import (
    exclude_classes,
    iter_probs,
    prepare_model,
    refine_with_crf,
    restrict_to_labels,
)
from wsss.log import setup_logging
from wsss.models.checkpoint import load_classifier, load_segmenter


def gate(probs: np.ndarray, scores: np.ndarray | None, variant: str, labels: tuple[int, ...],
         cooccur: np.ndarray | None = None) -> np.ndarray:
    """``probs (K, H, W)`` gated by ``scores (K-1,)`` (classifier sigmoid per foreground class) as ``variant``
    says (``none``, ``oracle``, ``hard T``, ``soft A``, ``exclusive T``: the predict stage's class exclusion
    with ``cooccur (K-1, K-1)``); a new array unless ``none``."""
    if "+" in variant:  # "G1+G2": one gate after the other
        first, _, second = variant.partition("+")
        return gate(gate(probs, scores, first, labels, cooccur), scores, second, labels, cooccur)
    kind, _, value = variant.partition(" ")
    if kind == "none":
        return probs
    if kind == "exclusive":
        return exclude_classes(probs, cooccur, float(value))
    if kind == "smallest":  # "smallest A": drop the classes that win under A of the photo's pixels
        share = np.bincount(probs.argmax(0).ravel(), minlength=probs.shape[0]) / probs[0].size
        return restrict_to_labels(probs, [c for c in range(1, probs.shape[0]) if share[c] >= float(value)])
    if kind == "oracle":
        return restrict_to_labels(probs, labels)
    if kind == "hard":
        keep = [k + 1 for k in np.flatnonzero(scores >= float(value))] or [int(np.argmax(scores)) + 1]
        return restrict_to_labels(probs, keep)
    weights = np.concatenate([[1.0], scores ** float(value)]).astype(np.float32)[:, None, None]
    out = probs * weights
    return out / np.maximum(out.sum(0, keepdims=True), 1e-8)


def _score_one(i: int, ds: Dataset, probs: dict[str, np.ndarray], scores: dict[str, np.ndarray],
               variants: list[tuple[str, str, CrfConfig | None]], cooccur: np.ndarray | None) -> list[np.ndarray]:
    s = ds[i]
    image, gt = ds.read_image(i), ds.read_mask(i)
    p0 = probs[s.id].astype(np.float32)
    out = []
    for _, gate_spec, crf_cfg in variants:
        p = gate(p0, scores.get(s.id), gate_spec, s.labels, cooccur)
        if crf_cfg is not None:
            p = refine_with_crf(image, p, crf_cfg)
        out.append(confusion(gt, p.argmax(0), len(ds.classes)))
    return out


def crf_variant(base: CrfConfig, spec: str) -> CrfConfig:
    """``base`` with the ``KEY=VALUE[,KEY=VALUE]`` fields of ``spec`` changed (validated like the config)."""
    changes: dict[str, object] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in CrfConfig.model_fields:
            raise SystemExit(f"--crf-variant {spec!r}: expected KEY=VALUE with a crf field (known: {', '.join(CrfConfig.model_fields)})")
        changes[key.strip()] = yaml.safe_load(value)
    return CrfConfig.model_validate({**base.model_dump(), **changes})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/voc6_lite0_60min.yaml"),
                    help="its predict scales / flip / crf, crf section and train_cls input size are used")
    ap.add_argument("--data", type=Path, required=True, help="dataset root (VOC folder, COCO folder or CSV)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--segmenter", type=Path, required=True)
    ap.add_argument("--resize-long", type=int, required=True, help="long side the segmenter sees at scale 1")
    ap.add_argument("--classifier", type=Path, help="adds the oracle and the classifier gates below")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3, 0.5], help="hard gates")
    ap.add_argument("--powers", type=float, nargs="*", default=[0.25, 0.5, 1.0], help="soft gates")
    ap.add_argument("--crf-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="a prediction CRF with these crf fields changed (repeatable)")
    ap.add_argument("--exclusive", type=float, nargs="*", default=[],
                    help="class exclusion (predict.exclusive_below) at these shares, the co-occurrence counted on "
                         "--prior-split's image-level labels (what train-seg stores in segmenter.pt)")
    ap.add_argument("--smallest", type=float, nargs="*", default=[],
                    help="with --exclusive: then also drop the classes that win under this share of the photo's pixels")
    ap.add_argument("--prior-split", default="train", help="split whose image-level labels give the co-occurrence")
    ap.add_argument("--no-crf", action="store_true", help="the gates and 'none' without the prediction CRF")
    ap.add_argument("--workers", type=int, default=2, help="CRF processes")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    setup_logging(0)
    cfg = load_config(args.config)
    ds = load_dataset(args.data, args.split)
    if not ds.has_masks:
        raise SystemExit(f"split '{args.split}' of {args.data} has no ground-truth masks to score against")
    device = torch.device("cpu")
    base_crf = cfg.crf if cfg.predict.crf and not args.no_crf else None
    variants: list[tuple[str, str, CrfConfig | None]] = [("none", "none", base_crf)]
    variants += [(f"crf {spec}", "none", crf_variant(cfg.crf, spec)) for spec in args.crf_variant]
    scores: dict[str, np.ndarray] = {}
    gates: dict[float, dict[str, int]] = {}
    if args.classifier is not None:
        classifier, _ = load_classifier(args.classifier)
        with torch.inference_mode():
            table = predict_scores(classifier, ds, cfg.train_cls, device)
        scores = {s.id: row for s, row in zip(ds, table)}
        truth = ds.label_matrix() > 0  # (N, K-1), like the classifier's scores
        for t in args.thresholds:
            kept = table >= t
            gates[t] = {"missed": int((~kept & truth).sum()), "extra": int((kept & ~truth).sum()), "labels": int(truth.sum())}
            print(f"classifier >= {t}: {gates[t]['missed']} of {gates[t]['labels']} true labels missed, "
                  f"{gates[t]['extra']} absent classes kept", flush=True)
        variants += [(g, g, base_crf) for g in ("oracle", *(f"hard {t}" for t in args.thresholds), *(f"soft {a}" for a in args.powers))]
    cooccur = None
    if args.exclusive:
        cooccur = load_dataset(args.data, args.prior_split).cooccurrence()
        print(f"co-occurrence counts on {args.prior_split}:\n{cooccur}", flush=True)
        variants += [(f"excl {t}", f"exclusive {t}", base_crf) for t in args.exclusive]
        variants += [(f"excl {t} small {a}", f"exclusive {t}+smallest {a}", base_crf) for t in args.exclusive for a in args.smallest]
    segmenter, _ = load_segmenter(args.segmenter)
    segmenter = prepare_model(segmenter, device)
    probs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for sid, _, p in iter_probs(segmenter, [(s.id, s.image) for s in ds], cfg.predict.scales, cfg.predict.flip,
                                    args.resize_long, device, "none", cfg.predict.batch_size):
            probs[sid] = p.astype(np.float16)  # the photos' maps stay in memory: about 0.5 GB for 200 VOC photos
    with Pool(args.workers) as pool:  # forked workers share the maps without copying them
        res = pool.map(partial(_score_one, ds=ds, probs=probs, scores=scores, variants=variants, cooccur=cooccur), range(len(ds)))
    result = {"photos": len(ds), "classifier": gates, "variants": {}}
    for j, (name, _, _) in enumerate(variants):
        iou = iou_from_confusion(sum(r[j] for r in res))
        result["variants"][name] = {"mIoU": round(100 * float(np.nanmean(iou)), 2),
                                    "per_class": dict(zip(ds.classes, (100 * iou).round(1).tolist()))}
        print(f"{name:>10}: {result['variants'][name]['mIoU']:.2f}  "
              + " ".join(f"{c} {x:.1f}" for c, x in result["variants"][name]["per_class"].items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
