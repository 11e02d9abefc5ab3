"""The `wsss` command line. Thin wrappers: parse arguments, call a stage's core function."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

from wsss import __version__
from wsss.errors import WsssError

log = logging.getLogger("wsss")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=")


#: the config sections that choose a device; ``--device X`` sets all of them
DEVICE_SECTIONS = ("train_cls", "cam", "affinity", "train_seg", "predict")


def _overrides(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.synth.n_train=100 (anywhere on the line)")
    if device:
        sections = ", ".join(f"{s}.device" for s in DEVICE_SECTIONS)
        p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N for every stage (sets {sections})")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.sub=value`` tokens (which may appear anywhere) from the other arguments."""
    rest, over = [], []
    for tok in argv:
        (over if _OVERRIDE.match(tok) else rest).append(tok)
    return rest, over


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Weakly-supervised semantic segmentation: image-level tags in, pixel masks out.",
        epilog="Run `wsss COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"wsss {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="make the synthetic dataset, or check a dataset")
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
    check = dsub.add_parser("check", help="validate a dataset (VOC folder or CSV manifest) and summarise it")
    check.add_argument("root", type=Path, help="VOC-layout folder or CSV manifest")
    check.add_argument("--split", action="append", help="split(s) to check (default: every split file found)")
    check.add_argument("--classes", help="comma-separated class names, instead of classes.txt")
    check.add_argument("--json", type=Path, help="also write the report as JSON here")

    run = sub.add_parser("run", help="run the pipeline end to end from a YAML config")
    run.add_argument("config", type=Path, help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("--from", dest="from_stage", help="first stage to run")
    run.add_argument("--to", dest="to_stage", help="last stage to run")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run STAGE and everything after it")
    run.add_argument("--flow", choices=["standard", "fully-supervised", "ablation"], default="standard",
                     help="standard: the weakly-supervised pipeline; fully-supervised: the same segmenter recipe on "
                          "ground-truth masks (the upper bound; RUN/seg_gt, RUN/predict_gt); ablation: plain CAM vs "
                          "each expansion variant x each CRF mode, tabulated in RUN/ablation (section `ablation`)")
    _overrides(run)

    tc = sub.add_parser("train-cls", help="train the multi-label classifier from image-level labels")
    tc.add_argument("config", type=Path, help="YAML config (sections run, data, train_cls)")
    tc.add_argument("--force", action="store_true", help="retrain from scratch even if up to date")
    tc.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an interrupted run's checkpoint")
    _overrides(tc)

    cam = sub.add_parser("cam", help="extract class activation maps (CAM, Grad-CAM family)")
    cam.add_argument("config", type=Path, help="YAML config (sections run, data, cam)")
    cam.add_argument("--force", action="store_true", help="recompute every map")
    cam.add_argument("--shard", metavar="I/N", help="only every N-th image starting at I (0-based); see README, Scaling out")
    _overrides(cam)

    ex = sub.add_parser("expand", help="fine-tune with erasing / hide-and-seek / ACoL / mixup and extract expanded CAMs")
    ex.add_argument("config", type=Path, help="YAML config (sections run, data, train_cls, cam, expand)")
    ex.add_argument("--force", action="store_true", help="redo every round")
    _overrides(ex)

    crf = sub.add_parser("crf", help="refine CAMs with a dense CRF into palette-PNG pseudo-masks")
    crf.add_argument("config", type=Path, help="YAML config (sections run, data, cam, crf)")
    crf.add_argument("--workers", type=int, help="worker processes (crf.workers; default one per core)")
    crf.add_argument("--force", action="store_true", help="recompute every mask")
    crf.add_argument("--shard", metavar="I/N", help="only every N-th image starting at I (0-based); see README, Scaling out")
    crf.add_argument("--sweep", action="store_true", help="instead: try the crf.sweep grid on the first crf.sweep_images "
                     "labelled images and write the best setting as a config snippet (reads ground truth)")
    _overrides(crf)

    af = sub.add_parser("affinity", help="learn pixel affinities from the pseudo-masks, random-walk the CAMs, CRF them again")
    af.add_argument("config", type=Path, help="YAML config (sections run, data, cam, crf, affinity)")
    af.add_argument("--force", action="store_true", help="retrain the head and recompute every map and mask")
    _overrides(af)

    ts = sub.add_parser("train-seg", help="train a DeepLab segmenter on the pseudo-masks (or the ground truth: --masks gt)")
    ts.add_argument("config", type=Path, help="YAML config (sections run, data, train_seg)")
    ts.add_argument("--masks", choices=["pseudo", "gt"], help="train_seg.masks: pseudo-masks (default) or ground truth, "
                    "the fully-supervised reference (written to RUN/seg_gt)")
    ts.add_argument("--force", action="store_true", help="retrain from scratch even if up to date")
    ts.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an interrupted run's checkpoint")
    _overrides(ts)

    pr = sub.add_parser("predict", help="segment a dataset split, images or folders with a trained segmenter")
    pr.add_argument("config", type=Path, nargs="?", help="YAML config of the run (optional with --model and --input)")
    pr.add_argument("--model", type=Path, help="segmenter.pt (default RUN/seg/segmenter.pt, RUN/seg_gt with --masks gt)")
    pr.add_argument("--input", type=Path, nargs="+", help="image files or folders (instead of predict.split)")
    pr.add_argument("--out", type=Path, help="output folder (default RUN/predict/<split> (predict_gt with --masks gt), or RUN/predict/input)")
    pr.add_argument("--split", help="dataset split (predict.split)")
    pr.add_argument("--masks", choices=["pseudo", "gt"], help="which of the run's segmenters (train_seg.masks)")
    pr.add_argument("--crf", action="store_true", help="refine with the dense CRF (predict.crf=true)")
    pr.add_argument("--force", action="store_true", help="recompute every prediction")
    pr.add_argument("--shard", metavar="I/N", help="only every N-th image of the split starting at I (0-based)")
    _overrides(pr)

    ins = sub.add_parser("inspect", help="write an HTML gallery of a run's maps and masks (or --stats)")
    ins.add_argument("run_dir", type=Path, help="run directory (run.out_dir)")
    ins.add_argument("--split", help="split to show (default: the CAMs' split; val shows predictions)")
    ins.add_argument("--limit", type=int, default=200, help="first N images (0 = all; default 200)")
    ins.add_argument("--out", type=Path, help="output folder (default RUN/inspect/<split>)")
    ins.add_argument("--open", action="store_true", help="open the gallery in the web browser")
    ins.add_argument("--stats", action="store_true", help="instead: print class areas, ignore share and the images whose "
                     "pseudo-mask disagrees with their labels")
    ins.add_argument("--masks", type=Path, help="with --stats: mask folder (default RUN/crf)")

    ev = sub.add_parser("eval", help="score CAMs, pseudo-masks or segmenter predictions against ground truth")
    esub = ev.add_subparsers(dest="eval_command", metavar="WHAT")
    for what, flag, files, default, text in [
            ("cam", "--cams", "<id>.npz", "cam", "mIoU of CAM .npz files with a background-threshold sweep"),
            ("masks", "--masks", "<id>.png", "crf", "mIoU of pseudo-mask PNGs on the pixels they keep, kept share, confusion matrix"),
            ("seg", "--pred", "<id>.png", "predict/<split>", "mIoU of segmenter predictions (from `wsss predict`; "
             "RUN/predict_gt/<split> with train_seg.masks=gt), confusion matrix")]:
        e = esub.add_parser(what, help=text)
        e.add_argument("config", type=Path, nargs="?", help="YAML config of the run (default: flags below)")
        e.add_argument(flag, type=Path, help=f"folder of {files} (default RUN/{default})")
        e.add_argument("--data", type=Path, help="dataset (VOC folder or CSV) with ground-truth masks (default: the run's)")
        e.add_argument("--split", help="split to score (default predict.split for seg, else cam.split)")
        e.add_argument("--out", type=Path, help=f"report folder (default <{flag[2:]}>/eval)")
        _overrides(e, device=False)

    return parser


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
    from wsss.data.check import check_dataset
    from wsss.data.dataset import load_dataset
    from wsss.errors import DataError
    from wsss.io import write_json

    root: Path = args.root
    if not root.exists():
        raise DataError("dataset folder not found", root)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if args.split:
        splits = args.split
    elif root.suffix.lower() == ".csv":
        splits = [""]
    else:
        split_dir = root / "ImageSets" / "Segmentation"
        splits = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        if not splits:
            raise DataError("no split files in ImageSets/Segmentation/", root)
    reports = []
    for split in splits:
        ds = load_dataset(root, split or "train", classes)
        rep = check_dataset(ds)
        reports.append(rep)
        print("\n".join(rep.summary_lines()))
    if args.json:
        write_json(args.json, {r.split or "all": r.to_dict() for r in reports})
    n_prob = sum(len(r.problems) for r in reports)
    if n_prob:
        for r in reports:
            for p in r.problems:
                print(f"wsss: error: {p}", file=sys.stderr)
        print(f"wsss: {n_prob} problem(s) found in {root}", file=sys.stderr)
        return 1
    total = sum(r.images for r in reports)
    print(f"ok: {total} images in {len(reports)} split(s), {len(reports[0].classes) - 1} classes, no problems")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.standard import STAGE_ORDER, run
    from wsss.config import load_config
    from wsss.errors import ConfigError

    stages = ("ablation",) if args.flow == "ablation" else STAGE_ORDER
    for s in [args.from_stage, args.to_stage, *args.force]:
        if s is not None and s not in stages:
            raise ConfigError(f"unknown stage '{s}' for the {args.flow} flow (stages: {', '.join(stages)})")
    cfg = load_config(args.config, args.overrides)
    if args.flow != "standard" and (args.from_stage or args.to_stage):
        raise ConfigError("--from/--to apply to the standard flow only")
    if args.flow == "ablation":
        from pipelines import ablation

        res = ablation.run(cfg, force=bool(args.force))
        print(res.table, end="")
        print(f"best CAM mIoU: {res.best}; table: {res.run_dir / 'ablation' / 'table.md'}")
        return 0
    if args.flow == "fully-supervised":
        from pipelines import fully_supervised

        res = fully_supervised.run(cfg, tuple(args.force))
        for name, secs, skipped in res.done:
            print(f"  {name:<10} {'up to date' if skipped else 'done':<11} {secs:8.1f}")
        m = res.report["metrics"]
        print(f"  segmenter trained on ground truth: mIoU {m['seg_gt']['mIoU']:.1f} on {cfg.predict.split}"
              + (f"; weakly-supervised {m['seg']['mIoU']:.1f}, ratio {m['ratio']:.3f}" if "ratio" in m else ""))
        print(f"run directory: {res.run_dir}")
        return 0
    else:
        res = run(cfg, args.from_stage, args.to_stage, tuple(args.force))
    from wsss.report import summary_lines

    print("\n".join(summary_lines(res.report, res.done)))
    if res.disabled:
        print(f"  disabled in the config: {', '.join(res.disabled)}")
    print(f"report: {res.run_dir / 'report.html'}")
    if res.gallery is not None:
        print(f"gallery: {res.gallery}")
    print(f"run directory: {res.run_dir}")
    return 0


def _stage_setup(args: argparse.Namespace):
    """Config of a stage command, its run directory (with the resolved config saved) and the data stage
    brought up to date: ``(cfg, run_dir)``."""
    from wsss.config import load_config, save_config
    from wsss.stages.data import run_data_stage

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    run_data_stage(cfg.data, run_dir)
    return cfg, run_dir


def _run_training(args: argparse.Namespace, section: str, stage_fn):
    """Run a training stage ``stage_fn(cfg, run_dir, force=, resume=)``, also under torchrun: join the
    process group (``WORLD_SIZE`` > 1), let rank 0 prepare the run directory first, and return
    ``(cfg, run_dir, outcome)`` on rank 0, None on the other ranks."""
    from wsss.config import load_config
    from wsss.training import barrier, init_distributed, is_main

    started = init_distributed(getattr(load_config(args.config, args.overrides), section).device)
    main_rank = is_main()
    try:
        if main_rank:
            cfg, run_dir = _stage_setup(args)
        barrier()
        if not main_rank:
            cfg, run_dir = _stage_setup(args)
        outcome = stage_fn(cfg, run_dir, force=args.force, resume=getattr(args, "resume", True))
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return (cfg, run_dir, outcome) if main_rank else None


def _cmd_train_cls(args: argparse.Namespace) -> int:
    from wsss.stages.train_cls import run_train_cls_stage

    res = _run_training(args, "train_cls", run_train_cls_stage)
    if res is None:
        return 0
    cfg, run_dir, outcome = res
    final = outcome.manifest["outputs"].get("final", {})
    state = "up to date" if outcome.skipped else "trained"
    extras = ", ".join(f"{k} {v}" for k, v in final.items() if k.startswith("val_") or k == "loss")
    print(f"train-cls: {state}; {extras} -> {run_dir / 'cls' / 'classifier.pt'}")
    return 0


def _sharded(args: argparse.Namespace, fn):
    """Run a per-image stage ``fn(shard)``: the ``--shard`` given, else under torchrun this rank's shard
    followed (after a barrier) by rank 0's merge, else the whole split."""
    from wsss.errors import ConfigError
    from wsss.shard import env_shard, parse_shard

    if args.shard:
        if args.force:
            raise ConfigError("--force cannot be combined with --shard (it would clear the other shards' files)")
        return fn(parse_shard(args.shard))
    shard = env_shard()
    if shard is None:
        return fn(None)
    import torch.distributed as dist

    outcome = fn(shard)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        if shard[0] == 0:
            outcome = fn(None)
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return outcome


def _print_shard(stage: str, outcome, out: Path) -> bool:
    man = outcome.manifest
    if "shard" not in man:
        return False
    i, n = man["shard"]
    print(f"{stage}: shard {i}/{n} done; {man['outputs']['images']} images ({man['outputs']['computed']} computed) -> {out}; "
          f"run `wsss {stage}` without --shard once every shard has finished, to check and merge them")
    return True


def _cmd_cam(args: argparse.Namespace) -> int:
    from wsss.stages.cam import run_cam_stage

    cfg, run_dir = _stage_setup(args)
    outcome = _sharded(args, lambda shard: run_cam_stage(cfg, run_dir, force=args.force, shard=shard))
    o = outcome.manifest["outputs"]
    if _print_shard("cam", outcome, run_dir / "cam"):
        return 0
    print(f"cam: {'up to date' if outcome.skipped else 'done'}; {o['images']} images -> {run_dir / 'cam'}")
    return 0


def _eval_setup(args: argparse.Namespace, folder: Path | None, default: str):
    """``(cfg, folder to score, split, dataset with ground truth, report folder)`` of an eval command."""
    from wsss.config import load_config
    from wsss.data.dataset import load_dataset
    from wsss.stages.data import dataset_root

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.out_dir)
    folder = Path(folder or run_dir / default)
    seg = default.startswith("predict")
    split = args.split or (cfg.predict.split if seg else cfg.cam.split)
    if seg and not args.pred:
        from wsss.stages.predict import predict_folder

        folder = predict_folder(cfg, run_dir, split)
    ds = load_dataset(args.data or dataset_root(cfg.data, run_dir), split, cfg.data.classes)
    return cfg, folder, split, ds, args.out or folder / "eval"


def _cmd_eval_cam(args: argparse.Namespace) -> int:
    from wsss.stages.eval import evaluate_cam_folder, write_cam_report

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


def _cmd_expand(args: argparse.Namespace) -> int:
    from wsss.stages.expand import run_expand_stage

    res = _run_training(args, "train_cls", lambda cfg, run_dir, force, resume: run_expand_stage(cfg, run_dir, force=force))
    if res is None:
        return 0
    cfg, run_dir, outcome = res
    o = outcome.manifest["outputs"]
    print(f"expand: {'up to date' if outcome.skipped else 'done'}; {'+'.join(o['methods'])}, {len(o['rounds'])} round(s), "
          f"fine-tuning {o['finetune_s']:.0f} s; {o['images']} images -> {run_dir / 'expand'}")
    return 0


def _cmd_crf(args: argparse.Namespace) -> int:
    from wsss.stages.crf import run_crf_stage, sweep_crf

    cfg, run_dir = _stage_setup(args)
    if args.sweep:
        res = sweep_crf(cfg, run_dir, workers=args.workers)
        keys = list(cfg.crf.sweep)
        print("  ".join(f"{k:>13}" for k in keys) + "   mIoU   kept%")
        for r in res["rows"]:
            mark = " <- best" if r is res["best"] else ""
            print("  ".join(f"{r[k]:13g}" for k in keys) + f"  {r['mIoU']:5.1f}  {r['kept_share']:5.1f}{mark}")
        b = res["best"]
        print(f"crf sweep: best mIoU {b['mIoU']:.1f} with {b['kept_share']:.1f}% kept on {res['images']} images "
              f"-> {Path(res['out']) / 'best.yaml'}")
        return 0
    outcome = _sharded(args, lambda shard: run_crf_stage(cfg, run_dir, force=args.force, workers=args.workers, shard=shard))
    o = outcome.manifest["outputs"]
    if _print_shard("crf", outcome, run_dir / "crf"):
        return 0
    print(f"crf: {'up to date' if outcome.skipped else 'done'}; {o['images']} masks from {o['source']}, "
          f"foreground {100 * o['mean_fg_share']:.1f}%, ignored {100 * o['mean_ignore_share']:.1f}% -> {run_dir / 'crf'}")
    return 0


def _cmd_affinity(args: argparse.Namespace) -> int:
    from wsss.stages.affinity import run_affinity_stage

    cfg, run_dir = _stage_setup(args)
    outcome = run_affinity_stage(cfg, run_dir, force=args.force)
    o = outcome.manifest["outputs"]
    print(f"affinity: {'up to date' if outcome.skipped else 'done'}; {o['images']} masks from {o['source']} walked along learned "
          f"affinities, foreground {100 * o['mean_fg_share']:.1f}%, ignored {100 * o['mean_ignore_share']:.1f}% -> {run_dir / 'affinity' / 'masks'}")
    return 0


def _cmd_eval_masks(args: argparse.Namespace) -> int:
    from wsss.stages.crf import evaluate_masks, write_mask_report

    seg = args.eval_command == "seg"
    _, masks, split, ds, out = _eval_setup(args, args.pred if seg else args.masks, "predict/<split>" if seg else "crf")
    res = evaluate_masks(masks, ds)
    write_mask_report(res, ds.classes, out)
    for name, v in res["per_class_iou"].items():
        print(f"  {name:<14} {'-' if v is None else f'{v:5.1f}'}")
    kept = "" if seg else f" on kept pixels, {res['kept_share']:.1f}% kept,"
    print(f"eval {args.eval_command}: mIoU {res['mIoU']:.1f}{kept} {res['images']} {split} images -> {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from wsss.gallery import default_split, mask_statistics, open_in_browser, write_gallery

    if args.stats:
        from wsss.stages.data import open_split

        split = args.split or default_split(args.run_dir)
        masks = args.masks or args.run_dir / "crf"
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


def _cmd_train_seg(args: argparse.Namespace) -> int:
    from wsss.stages.train_seg import run_train_seg_stage, seg_folder

    if args.masks:
        args.overrides = [*args.overrides, f"train_seg.masks={args.masks}"]
    res = _run_training(args, "train_seg", run_train_seg_stage)
    if res is None:
        return 0
    cfg, run_dir, outcome = res
    final = outcome.manifest["outputs"].get("final", {})
    state = "up to date" if outcome.skipped else "trained"
    extras = ", ".join(f"{k} {v}" for k, v in final.items() if k in ("loss", "val_mIoU"))
    print(f"train-seg: {state} on {cfg.train_seg.masks} masks; {extras} -> {run_dir / seg_folder(cfg.train_seg) / 'segmenter.pt'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from wsss.config import load_config
    from wsss.errors import ConfigError

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
        from wsss.stages.predict import predict_folder, run_predict_stage

        args.overrides = extra
        cfg, run_dir = _stage_setup(args)
        if args.model is None and args.out is None:
            outcome = _sharded(args, lambda shard: run_predict_stage(cfg, run_dir, force=args.force, shard=shard))
            o = outcome.manifest["outputs"]
            out = predict_folder(cfg, run_dir)
            if _print_shard("predict", outcome, out):
                return 0
            print(f"predict: {o['images']} {cfg.predict.split} images ({o['computed']} computed) -> {out}")
            return 0
        from wsss.stages.data import open_split

        ds = open_split(run_dir, cfg.predict.split)
        items = [(s.id, s.image) for s in ds]
        default_out = predict_folder(cfg, run_dir)
    else:
        from wsss.stages.predict import input_items

        cfg = load_config(args.config, extra)
        items = input_items(args.input)
        default_out = Path(cfg.run.out_dir) / "predict" / "input"
    from wsss.stages.predict import predict_items, segmenter_path
    from wsss.stages.train_seg import load_segmenter

    model_path = args.model or segmenter_path(cfg, Path(cfg.run.out_dir))
    model, meta = load_segmenter(model_path)
    out = args.out or default_out
    if args.force and out.is_dir():
        for f in out.glob("*.png"):
            f.unlink()
    o = predict_items(model, items, out, cfg.predict, cfg.predict.resize_long or meta.get("resize_long"),
                      cfg.crf if cfg.predict.crf else None, skip_done=True)
    print(f"predict: {o['images']} images ({o['computed']} computed) with {model_path} -> {out}")
    return 0


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
        args.overrides = [*args.overrides, *(f"{s}.device={args.device}" for s in DEVICE_SECTIONS)]
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        if args.command == "data":
            if args.data_command == "synth":
                return _cmd_synth(args)
            if args.data_command == "check":
                return _cmd_check(args)
            parser.parse_args(["data", "--help"])
        elif args.command == "run":
            return _cmd_run(args)
        elif args.command == "train-cls":
            return _cmd_train_cls(args)
        elif args.command == "cam":
            return _cmd_cam(args)
        elif args.command == "expand":
            return _cmd_expand(args)
        elif args.command == "crf":
            return _cmd_crf(args)
        elif args.command == "affinity":
            return _cmd_affinity(args)
        elif args.command == "train-seg":
            return _cmd_train_seg(args)
        elif args.command == "predict":
            return _cmd_predict(args)
        elif args.command == "inspect":
            return _cmd_inspect(args)
        elif args.command == "eval":
            if args.eval_command == "cam":
                return _cmd_eval_cam(args)
            if args.eval_command in ("masks", "seg"):
                return _cmd_eval_masks(args)
            parser.parse_args(["eval", "--help"])
        parser.print_help()
        return 0 if args.command is None else 2
    except WsssError as e:
        print(f"wsss: error: {error_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsss: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the environment (permissions, a full disk, a lost mount), not a bug: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"wsss: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
