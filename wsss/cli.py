"""The `wsss` command line: it parses, dispatches (``set_defaults(func=...)``; the stage subcommands come from
the table of stages) and prints; the work is in :mod:`wsss.pipeline` and the domain packages."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from wsss import __version__
from wsss.errors import WsssError
from wsss.pipeline.table import EVAL_SUBFOLDER, device_sections, folder_of, stage_folder

log = logging.getLogger("wsss")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=")




def _overrides(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.synth.n_train=100 (anywhere on the line)")
    if device:
        sections = ", ".join(f"{s}.device" for s in device_sections())
        p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N for every stage (sets {sections})")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.sub=value`` tokens (which may appear anywhere) from the other arguments."""
    rest, over = [], []
    for tok in argv:
        (over if _OVERRIDE.match(tok) else rest).append(tok)
    return rest, over


def _stage_parser(sub, stage) -> argparse.ArgumentParser:
    """A stage's subcommand: CONFIG, --force, overrides, and the options its table row allows."""
    p = sub.add_parser(stage.name, help=stage.help)
    p.add_argument("config", type=Path, help=f"YAML config (its {stage.section} section; reads {stage.reads})")
    p.add_argument("--force", action="store_true", help=f"recompute {stage.writes} even if up to date")
    if stage.name in ("train-cls", "train-seg"):
        p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an interrupted run's checkpoint")
    if stage.shardable:
        p.add_argument("--shard", metavar="I/N", help="only every N-th image starting at I (0-based); see README, Scaling out")
    _overrides(p)
    p.set_defaults(func=_cmd_stage)
    return p


def build_parser() -> argparse.ArgumentParser:
    from wsss.pipeline.table import STAGES

    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Weakly-supervised semantic segmentation: image-level tags in, pixel masks out.",
        epilog="Run `wsss COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"wsss {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="make the synthetic dataset, or check a dataset")
    data.set_defaults(func=lambda args: _help(data))
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    synth = dsub.add_parser("synth", help="write the built-in synthetic dataset (VOC layout)")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--config", type=Path, help="YAML config whose data.synth section is used")
    synth.add_argument("--seed", type=int, help="random seed (data.synth.seed)")
    synth.add_argument("--n-train", type=int, help="training images (data.synth.n_train)")
    synth.add_argument("--n-val", type=int, help="validation images (data.synth.n_val)")
    synth.add_argument("--size", type=int, help="image side in pixels (data.synth.size)")
    synth.add_argument("--force", action="store_true", help="replace an existing folder")
    _overrides(synth, device=False)
    synth.set_defaults(func=_cmd_synth)
    check = dsub.add_parser("check", help="validate a dataset (VOC folder or CSV manifest) and summarise it")
    check.add_argument("root", type=Path, help="VOC-layout folder or CSV manifest")
    check.add_argument("--split", action="append", help="split(s) to check (default: every split file found)")
    check.add_argument("--classes", help="comma-separated class names, instead of classes.txt")
    check.add_argument("--json", type=Path, help="also write the report as JSON here")
    check.set_defaults(func=_cmd_check)

    run = sub.add_parser("run", help="run the pipeline end to end from a YAML config")
    run.add_argument("config", type=Path, help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--from", dest="from_stage", help="first stage to run")
    run.add_argument("--to", dest="to_stage", help="last stage to run")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run STAGE and everything after it")
    run.add_argument("--flow", choices=["standard", "fully-supervised", "self-training", "ablation"], default="standard",
                     help="standard: the weakly-supervised pipeline; fully-supervised: the same segmenter recipe on "
                          "ground-truth masks (the upper bound; RUN/seg_gt, RUN/predict_gt); self-training: the standard "
                          "flow, then the segmenter retrained on its own CRF-refined predictions of the train split "
                          "(RUN/self_training); ablation: plain CAM vs each expansion variant x each CRF mode, tabulated "
                          "in RUN/ablation (section `ablation`)")
    _overrides(run)
    run.set_defaults(func=_cmd_run)

    stages = {s.name: _stage_parser(sub, s) for s in STAGES if s.name not in ("data", "predict", "eval")}
    stages["crf"].add_argument("--workers", type=int, help="worker processes (crf.workers; default one per core)")
    stages["crf"].add_argument("--sweep", action="store_true", help="instead: try the crf.sweep grid on the first crf.sweep_images "
                               "labelled images and write the best setting as a config snippet (reads ground truth)")
    stages["crf"].add_argument("--maps", choices=["crf", "seg-maps", "affinity"], default="crf", help="with --sweep: the maps to "
                               "refine; crf = the ones the crf stage reads (default), seg-maps = the seg-maps stage's maps, "
                               "affinity = the affinity stage's walked maps (the thresholds go under segmaps: or affinity: in the snippet)")
    stages["train-seg"].add_argument("--masks", choices=["pseudo", "gt"], help="train_seg.masks: pseudo-masks (default) or ground "
                                     "truth, the fully-supervised reference (written to RUN/seg_gt)")

    pr = sub.add_parser("predict", help="segment a dataset split, images or folders with a trained segmenter")
    pr.add_argument("config", type=Path, nargs="?", help="YAML config of the run (optional with --model and --input)")
    pr.add_argument("--model", type=Path, help="segmenter.pt (default RUN/seg/segmenter.pt, RUN/seg_gt with --masks gt)")
    pr.add_argument("--input", type=Path, nargs="+", help="image files or folders (instead of predict.split); an unreadable "
                    "image is skipped with a warning, and the command ends with exit code 1 listing them")
    pr.add_argument("--recursive", action="store_true", help="with --input: also the images in subfolders (outputs keep the subfolders)")
    pr.add_argument("--out", type=Path, help="output folder (default RUN/predict/<split> (predict_gt with --masks gt), or RUN/predict/input)")
    pr.add_argument("--split", help="dataset split (predict.split)")
    pr.add_argument("--masks", choices=["pseudo", "gt"], help="which of the run's segmenters (train_seg.masks)")
    pr.add_argument("--crf", action="store_true", help="refine with the dense CRF (predict.crf=true)")
    pr.add_argument("--force", action="store_true", help="recompute every prediction")
    pr.add_argument("--shard", metavar="I/N", help="only every N-th image of the split starting at I (0-based)")
    _overrides(pr)
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a trained segmenter or classifier to ONNX or TorchScript (deploy without wsss)")
    ex.add_argument("source", type=Path, help="run directory (run.out_dir) or a segmenter.pt / classifier.pt file")
    ex.add_argument("--what", choices=["seg", "cls"], default="seg", help="the segmenter (RUN/seg) or the classifier (RUN/cls)")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="onnx: dynamic batch and image size")
    ex.add_argument("--out", type=Path, required=True, help="file to write (e.g. model.onnx)")
    ex.set_defaults(func=_cmd_export)

    ins = sub.add_parser("inspect", help="write an HTML gallery of a run's maps and masks (or --stats)")
    ins.add_argument("run_dir", type=Path, help="run directory (run.out_dir)")
    ins.add_argument("--split", help="split to show (default: the CAMs' split; val shows predictions)")
    ins.add_argument("--limit", type=int, default=200, help="first N images (0 = all; default 200)")
    ins.add_argument("--out", type=Path, help="output folder (default RUN/inspect/<split>)")
    ins.add_argument("--open", action="store_true", help="open the gallery in the web browser")
    ins.add_argument("--stats", action="store_true", help="instead: print class areas, ignore share and the images whose "
                     "pseudo-mask disagrees with their labels")
    ins.add_argument("--masks", type=Path, help="with --stats: mask folder (default RUN/crf)")
    ins.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("eval", help="score CAMs, pseudo-masks or segmenter predictions against ground truth")
    ev.set_defaults(func=lambda args: _help(ev))
    esub = ev.add_subparsers(dest="eval_command", metavar="WHAT")
    for what, flag, files, default, text, func in [
            ("cam", "--cams", "<id>.npz", "cam", "mIoU of CAM .npz files with a background-threshold sweep", _cmd_eval_cam),
            ("masks", "--masks", "<id>.png", "crf", "mIoU of pseudo-mask PNGs on the pixels they keep, kept share, confusion matrix",
             _cmd_eval_masks),
            ("seg", "--pred", "<id>.png", "predict/<split>", "mIoU of segmenter predictions (from `wsss predict`; "
             "RUN/predict_gt/<split> with train_seg.masks=gt), confusion matrix", _cmd_eval_masks)]:
        e = esub.add_parser(what, help=text)
        e.add_argument("config", type=Path, nargs="?", help="YAML config of the run (default: flags below)")
        e.add_argument(flag, type=Path, help=f"folder of {files} (default RUN/{default})")
        e.add_argument("--data", type=Path, help="dataset (VOC folder or CSV) with ground-truth masks (default: the run's)")
        e.add_argument("--split", help="split to score (default predict.split for seg, else cam.split)")
        e.add_argument("--out", type=Path, help=f"report folder (default <{flag[2:]}>/eval)")
        _overrides(e, device=False)
        e.set_defaults(func=func)

    return parser


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from wsss.config import load_config
    from wsss.data.synth import generate

    extra = [f"data.synth.{k}={v}" for k, v in (("seed", args.seed), ("n_train", args.n_train), ("n_val", args.n_val), ("size", args.size)) if v is not None]
    over = [o if o.startswith(("data.", "run.")) else f"data.synth.{o}" for o in args.overrides]
    cfg = load_config(args.config, [*over, *extra])
    out = generate(cfg.data.synth, args.out, force=args.force)
    s = cfg.data.synth
    print(f"synthetic dataset: {s.n_train} train + {s.n_val} val images, {s.size}x{s.size}, classes {', '.join(s.classes)} -> {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from wsss.data.check import check_root
    from wsss.io import write_json

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    reports = check_root(args.root, args.split, classes)
    for rep in reports:
        print("\n".join(rep.summary_lines()))
    if args.json:
        write_json(args.json, {r.split or "all": r.to_dict() for r in reports})
    n_prob = sum(len(r.problems) for r in reports)
    if n_prob:
        for r in reports:
            for p in r.problems:
                print(f"wsss: error: {p}", file=sys.stderr)
        print(f"wsss: {n_prob} problem(s) found in {args.root}", file=sys.stderr)
        return 1
    total = sum(r.images for r in reports)
    print(f"ok: {total} images in {len(reports)} split(s), {len(reports[0].classes) - 1} classes, no problems")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from wsss.api import run
    from wsss.config import load_config
    from wsss.errors import ConfigError
    from wsss.pipeline.runner import stage_slice
    from wsss.pipeline.table import STAGE_NAMES

    stages = ("ablation",) if args.flow == "ablation" else STAGE_NAMES
    for s in [args.from_stage, args.to_stage, *args.force]:
        if s is not None and s not in stages:
            raise ConfigError(f"unknown stage '{s}' for the {args.flow} flow (stages: {', '.join(stages)})")
    if args.flow != "standard" and (args.from_stage or args.to_stage):
        raise ConfigError("--from/--to apply to the standard flow only")
    chosen = stage_slice(STAGE_NAMES, args.from_stage, args.to_stage)  # an empty or reversed slice is a usage error
    cfg = load_config(args.config, args.overrides)
    if args.flow == "ablation":
        res = run(cfg, flow="ablation", force=("ablation",) if args.force else ())
        print(res.table, end="")
        print(f"best CAM mIoU: {res.best}; table: {res.run_dir / 'ablation' / 'table.md'}")
        return 0
    if args.flow == "fully-supervised":
        res = run(cfg, flow="fully-supervised", force=tuple(args.force))
        for name, secs, skipped in res.done:
            print(f"  {name:<10} {'up to date' if skipped else 'done':<11} {secs:8.1f}")
        m = res.report["metrics"]
        print(f"  segmenter trained on ground truth: mIoU {m['seg_gt']['mIoU']:.1f} on {cfg.predict.split}"
              + (f"; weakly-supervised {m['seg']['mIoU']:.1f}, ratio {m['ratio']:.3f}" if "ratio" in m else ""))
        print(f"run directory: {res.run_dir}")
        return 0
    if args.flow == "self-training":
        res = run(cfg, flow="self-training", force=tuple(args.force))
        m = res.report["metrics"]
        before, after = m.get("seg_round0", {}).get("mIoU"), m.get("seg", {}).get("mIoU")
        print(f"  segmenter mIoU on {cfg.predict.split}: round 0 {before:.1f}, after one round of self-training {after:.1f}"
              if before is not None and after is not None else "  (no ground truth to score the rounds)")
        print(f"report: {res.run_dir / 'report.html'}")
        print(f"run directory: {res.run_dir}")
        return 0
    res = run(cfg, chosen if (args.from_stage or args.to_stage) else None, force=tuple(args.force))
    from wsss.pipeline.report import summary_lines

    print("\n".join(summary_lines(res.report, res.done)))
    if res.disabled:
        print(f"  disabled in the config: {', '.join(res.disabled)}")
    print(f"report: {res.run_dir / 'report.html'}")
    if res.gallery is not None:
        print(f"gallery: {res.gallery}")
    print(f"run directory: {res.run_dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from wsss.export import export_model

    res = export_model(args.source, args.out, args.what, args.format)
    print(f"exported the {'segmenter' if res['kind'] == 'seg' else 'classifier'} {res['model']} -> {res['file']} "
          f"({res['format']}; input 'image' float32 (B, 3, H, W) RGB in [0, 1]; outputs {', '.join(res['outputs'])}; "
          f"classes {', '.join(res['classes'])})")
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    """A stage of the table as a command: run it (also under torchrun or as one --shard) and print its line."""
    from wsss.config import load_config
    from wsss.pipeline.runner import hold_run, run_command, setup_run
    from wsss.pipeline.table import get_stage
    from wsss.shard import parse_shard

    stage = get_stage(args.command)
    if getattr(args, "masks", None):
        args.overrides = [*args.overrides, f"train_seg.masks={args.masks}"]
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.out_dir)
    if getattr(args, "maps", "crf") != "crf" and not args.sweep:
        raise WsssError("--maps chooses the maps of a sweep: use it with --sweep")
    if getattr(args, "sweep", False):
        from wsss.stages.crf import sweep

        with hold_run(cfg.run.out_dir):
            res = sweep(cfg, setup_run(cfg), workers=args.workers, maps=args.maps)
        keys = list(cfg.crf.sweep)
        print("  ".join(f"{k:>13}" for k in keys) + "   mIoU   kept%   every-pixel mIoU")
        for r in res["rows"]:
            mark = " <- best" if r is res["best"] else ""
            print("  ".join(f"{r[k]:13g}" for k in keys) + f"  {r['mIoU']:5.1f}  {r['kept_share']:5.1f}  {r['mIoU_ignored_as_bg']:5.1f}{mark}")
        for skipped in res["skipped"]:
            print("  ".join(f"{skipped[k]:13g}" for k in keys) + "  skipped: not a valid setting")
        b = res["best"]
        print(f"crf sweep ({args.maps} maps, best by {cfg.crf.sweep_score}): mIoU {b['mIoU']:.1f} with {b['kept_share']:.1f}% kept, "
              f"{b['mIoU_ignored_as_bg']:.1f} with ignored pixels as background, on {res['images']} images -> {Path(res['out']) / 'best.yaml'}")
        return 0
    options = {k: getattr(args, k) for k in ("resume", "workers") if getattr(args, k, None) is not None}
    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    outcome = run_command(stage.name, cfg, force=args.force, shard=shard, **options)
    if outcome is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if "shard" in outcome.manifest:
        (i, n), o = outcome.manifest["shard"], outcome.manifest["outputs"]
        print(f"{stage.name}: shard {i}/{n} done; {o['images']} images ({o['computed']} computed) -> {folder_of(cfg, run_dir, stage.name)}; "
              f"run `wsss {stage.name}` without --shard once every shard has finished, to check and merge them")
        return 0
    print(stage.adapter().summary(cfg, run_dir, outcome))
    return 0


def _eval_setup(args: argparse.Namespace, folder: Path | None, stage: str):
    """``(cfg, folder to score, split, dataset with ground truth, report folder)`` of an eval command that
    scores ``folder``, by default the output of ``stage``."""
    from wsss.config import load_config
    from wsss.data.dataset import load_dataset
    from wsss.pipeline.runner import dataset_root

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.out_dir)
    seg = stage == "predict"
    split = args.split or (cfg.predict.split if seg else cfg.cam.split)
    folder = Path(folder or folder_of(cfg, run_dir, stage, split))
    ds = load_dataset(args.data or dataset_root(cfg.data, run_dir), split, cfg.data.classes)
    return cfg, folder, split, ds, args.out or folder / EVAL_SUBFOLDER


def _cmd_eval_cam(args: argparse.Namespace) -> int:
    from wsss.evaluation.cams import evaluate_cam_folder, write_cam_report

    cfg, cams, split, ds, out = _eval_setup(args, args.cams, "cam")
    result = evaluate_cam_folder(cams, ds, cfg.eval.thresholds)
    summary = write_cam_report(result, ds.classes, out, title=f"{cams.name} on {split}")
    print("threshold   mIoU  fg-prec  fg-rec")
    for row in result.rows():
        mark = " <- best" if row["threshold"] == result.best_threshold else ""
        print(f"  {row['threshold']:7.2f}  {100 * row['mIoU']:5.1f}  {100 * row['fg_precision']:7.1f}  {100 * row['fg_recall']:6.1f}{mark}")
    print(f"eval cam: mIoU {summary['mIoU']:.1f} at threshold {summary['best_threshold']:.2f} "
          f"(fg precision {summary['fg_precision']:.1f}, recall {summary['fg_recall']:.1f}) on {len(ds)} {split} images -> {out}")
    return 0


def _cmd_eval_masks(args: argparse.Namespace) -> int:
    from wsss.evaluation.masks import evaluate_masks, write_mask_report

    seg = args.eval_command == "seg"
    _, masks, split, ds, out = _eval_setup(args, args.pred if seg else args.masks, "predict" if seg else "crf")
    res = evaluate_masks(masks, ds)
    write_mask_report(res, ds.classes, out)

    def cell(v: float | None) -> str:
        return "    -" if v is None else f"{v:5.1f}"
    err = res["errors"]
    if seg:
        print(f"  {'class':<14} {'IoU':>5}  {'prec':>5}  {'rec':>5}")
    else:
        print(f"  {'class':<14} {'kept':>5}  {'every pixel':>11}  {'prec':>5}  {'rec':>5}   (precision, recall: every pixel)")
    for name, v in res["per_class_iou"].items():
        both = "" if seg else f"  {cell(res['per_class_iou_ignored_as_bg'][name]):>11}"
        print(f"  {name:<14} {cell(v)}{both}  {cell(err['precision'][name])}  {cell(err['recall'][name])}")
    print("  recall by object size (share of the photo): " + ", ".join(
        f"{size} {cell(r).strip()} ({n})" for (size, r), n in zip(err["recall_by_size"].items(), err["objects_by_size"].values())))
    kept = "" if seg else f" on kept pixels, {res['kept_share']:.1f}% kept ({res['mIoU_ignored_as_bg']:.1f} with ignored pixels as background),"
    print(f"eval {args.eval_command}: mIoU {res['mIoU']:.1f}{kept} {res['images']} {split} images -> {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from wsss.pipeline.gallery import default_split, mask_statistics, open_in_browser, write_gallery

    if args.stats:
        from wsss.pipeline.runner import open_split
        from wsss.pipeline.table import stage_folder

        split = args.split or default_split(args.run_dir)
        masks = args.masks or args.run_dir / stage_folder("crf")
        if not masks.is_dir():
            raise WsssError("no pseudo-mask folder; run `wsss crf CONFIG` first or give --masks", masks)
        st = mask_statistics(open_split(args.run_dir, split), masks)
        print(f"{'class':<14} {'area %':>7}")
        for c, a in st["class_area"].items():
            print(f"{c:<14} {a:7.2f}")
        print(f"{'ignore (255)':<14} {st['ignore_share']:7.2f}")
        for d in st["disagree"][:20]:
            parts = [f"labelled but absent: {', '.join(d['missing'])}"] if d["missing"] else []
            parts += [f"present but not labelled: {', '.join(d['unlabelled'])}"] if d["unlabelled"] else []
            print(f"  {d['id']}: {'; '.join(parts)}")
        more = len(st["disagree"]) - 20
        print(f"inspect: {st['images']} masks in {masks}; {len(st['disagree'])} disagree with their labels"
              + (f" ({more} more not listed)" if more > 0 else ""))
        return 0
    page = write_gallery(args.run_dir, args.split, args.out, args.limit)
    print(f"inspect: gallery -> {page}")
    if args.open:
        open_in_browser(page)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from wsss.config import load_config
    from wsss.errors import ConfigError
    from wsss.inference import input_items
    from wsss.pipeline.runner import hold_run, open_split, setup_run

    extra = list(args.overrides)
    if args.masks:
        extra.append(f"train_seg.masks={args.masks}")
    if args.split:
        extra.append(f"predict.split={args.split}")
    if args.crf:
        extra.append("predict.crf=true")
    if args.input is None:
        if args.config is None:
            raise ConfigError("give a CONFIG (to predict its predict.split), or --model and --input")
        if args.model is None and args.out is None:
            args.overrides = extra
            return _cmd_stage(args)
        cfg = load_config(args.config, extra)
        with hold_run(cfg.run.out_dir):
            run_dir = setup_run(cfg)
            items = [(s.id, s.image) for s in open_split(run_dir, cfg.predict.split)]
            return _predict_paths(args, cfg, items, folder_of(cfg, run_dir, "predict"))
    cfg = load_config(args.config, extra)
    items = input_items(args.input, recursive=args.recursive)
    return _predict_paths(args, cfg, items, Path(cfg.run.out_dir) / stage_folder("predict", split="input"))


def _predict_paths(args: argparse.Namespace, cfg, items: list, default_out: Path) -> int:
    from wsss.stages.predict import predict_paths, segmenter_path

    model_path = args.model or segmenter_path(cfg, Path(cfg.run.out_dir))
    out = args.out or default_out
    o = predict_paths(cfg, model_path, items, out, force=args.force)
    print(f"predict: {o['images']} images ({o['computed']} computed) with {model_path} -> {out}")
    if o["skipped"]:
        print(f"wsss: error: {len(o['skipped'])} unreadable image(s) skipped: {', '.join(o['skipped'])}", file=sys.stderr)
        return 1
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised like Ctrl-C so that every cleanup runs."""


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` while a command runs; returns the handler it replaced (None
    off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


def error_line(e: BaseException) -> str:
    """The one line to print for a user-facing error. An error raised in a DataLoader worker comes back
    wrapped with the worker's traceback; keep only its own message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from wsss.log import setup_logging

    parser = build_parser()
    rest, over = split_overrides(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if over:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no config overrides: {' '.join(over)}")
        args.overrides = [*args.overrides, *over]
    if getattr(args, "device", None):
        args.overrides = [*args.overrides, *(f"{s}.device={args.device}" for s in device_sections())]
    setup_logging(-1 if args.quiet else args.verbose)
    if args.func is None:
        parser.print_help()
        return 0
    previous = _catch_sigterm()
    try:
        return args.func(args)
    except WsssError as e:
        print(f"wsss: error: {error_line(e)}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("wsss: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("wsss: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the environment (permissions, a full disk, a lost mount), not a bug: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"wsss: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
