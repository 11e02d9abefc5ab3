"""The run report: ``RUN/report.json`` and a self-contained ``RUN/report.html`` (plots inlined), built
only from the files the stages wrote (manifests, logs, eval summaries), and a terminal summary table.

report.json::

    {"run": name, "config": {...}, "stages": [{"stage", "folder", "seconds", "finished", "outputs"}],
     "metrics": {"cam": {...}, "expand": {...}, "crf": {...}, "seg": {...}}, "curves": {"cls": [...], "seg": [...]}}
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path
from typing import Any

import yaml

from wsss.io import read_json, write_json, write_text
from wsss.manifest import read_manifest
from wsss.pipeline.table import EVAL_SUBFOLDER, STAGES, stage_folder

log = logging.getLogger(__name__)


METRIC_LABELS = {"cam": "CAM seeds", "expand": "expanded CAMs", "crf": "pseudo-masks", "seg-maps": "segmenter-map pseudo-masks",
                 "affinity": "affinity pseudo-masks", "seg": "segmenter",
                 "seg_gt": "segmenter on ground truth"}


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def collect(run_dir: str | Path, seg_folder: str = "seg", split: str = "val") -> dict[str, Any]:
    """Everything the report shows, read from ``run_dir``."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    # an expand/ folder left by an earlier `wsss expand` is not part of a run that has the stage switched off
    disabled = {s.name for s in STAGES if s.enabled is not None and config
                and not config.get(s.section, {}).get("enabled", s.name == "expand")}
    gt = seg_folder == stage_folder("train-seg", gt=True)
    stages = []
    for stage in (s.name for s in STAGES):
        folder = stage_folder(stage, gt, split)
        man = None if stage in disabled else read_manifest(run_dir / folder)
        if man is None:
            continue
        stages.append({"stage": stage, "folder": folder, "seconds": man.get("wall_time_s"), "finished": man.get("finished"),
                       "outputs": {k: v for k, v in man.get("outputs", {}).items() if not isinstance(v, (dict, list))},
                       "warnings": list(man.get("outputs", {}).get("warnings", []))})
    summary = run_dir / stage_folder("eval") / "summary.json"
    metrics = read_json(summary) if summary.is_file() else {}
    ref = run_dir / stage_folder("predict", True, split) / EVAL_SUBFOLDER / "summary.json"
    if ref.is_file():  # the fully-supervised reference flow's score, and the ratio to it
        metrics["seg_gt"] = {k: v for k, v in read_json(ref).items() if k != "kept_share"} | {"split": split}
        if "seg" in metrics and metrics["seg_gt"]["mIoU"]:
            metrics["ratio"] = round(metrics["seg"]["mIoU"] / metrics["seg_gt"]["mIoU"], 3)
    sweeps = {name: _read_csv(run_dir / stage_folder(name) / EVAL_SUBFOLDER / "sweep.csv") for name in ("cam", "expand") if name not in disabled}
    metrics = {k: v for k, v in metrics.items() if k not in disabled}
    warnings = [f"{st['stage']}: {w}" for st in stages for w in st.pop("warnings")]
    return {"run": run_dir.name, "config": config, "stages": stages, "metrics": metrics, "warnings": warnings,
            "curves": {"cls": _read_csv(run_dir / stage_folder("train-cls") / "log.csv"), "seg": _read_csv(run_dir / seg_folder / "log.csv")},
            "sweeps": {k: v for k, v in sweeps.items() if v}}


def summary_lines(report: dict[str, Any], done: list[tuple[str, float, bool]] | None = None) -> list[str]:
    """The terminal table: one line per finished stage with its status in this run (from ``done``:
    ``(stage, seconds, skipped)``), the seconds its output took to make, and its score when scored."""
    status = {name: "up to date" if skipped else "done" for name, _, skipped in (done or [])}
    lines = [f"  {'stage':<10} {'status':<11} {'seconds':>8}   result"]
    m = report["metrics"]
    for st in report["stages"]:
        name = st["stage"]
        key = "seg" if name == "predict" else name
        res = _metric_text(key, m[key]) if key in m else ""
        secs = "" if st["seconds"] is None else f"{st['seconds']:8.1f}"
        lines.append(f"  {name:<10} {status.get(name, 'not run'):<11} {secs:>8}   {res}".rstrip())
    if "seg_gt" in m:
        lines.append(f"  {'':<31}{_metric_text('seg_gt', m['seg_gt'])}")
    if "ratio" in m:
        lines.append(f"  {'':<31}weakly- / fully-supervised ratio {m['ratio']:.3f}")
    lines += [f"  WARNING {w}" for w in report.get("warnings", [])]
    return lines


def _metric_text(key: str, r: dict[str, Any]) -> str:
    if key in ("seg", "seg_gt"):
        return f"{METRIC_LABELS[key]} mIoU {r['mIoU']:.1f} on {r.get('split', 'val')}"
    if "kept_share" in r:
        every = r.get("mIoU_ignored_as_bg")  # absent from summaries written before it existed
        tail = "" if every is None else f"; {every:.1f} with ignored pixels as background"
        return f"pseudo-masks mIoU {r['mIoU']:.1f} on kept pixels, {r['kept_share']:.1f}% kept{tail}"
    return (f"{METRIC_LABELS[key]} mIoU {r['mIoU']:.1f} at threshold {r['best_threshold']:.2f} "
            f"(fg precision {r['fg_precision']:.1f}, recall {r['fg_recall']:.1f})")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    curves = {k: v for k, v in report["curves"].items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2), squeeze=False)
        fig.subplots_adjust(wspace=0.55)
        for ax, (name, rows) in zip(axes[0], curves.items()):
            ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], "o-", label="train loss")
            ax.set_xlabel("epoch")
            ax.set_title({"cls": "classifier", "seg": "segmenter"}[name])
            val = "val_mAP" if name == "cls" else "val_mIoU"
            pts = [(r["epoch"], r[val]) for r in rows if isinstance(r.get(val), (int, float))]
            if pts:
                ax2 = ax.twinx()
                ax2.plot(*zip(*pts), "s--", color="tab:orange", label=val)
                ax2.set_ylabel(val, color="tab:orange")
            ax.set_ylabel("loss")
        out["curves"] = _png(fig)
    if report["sweeps"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, rows in report["sweeps"].items():
            ax.plot([r["threshold"] for r in rows], [100 * r["mIoU"] for r in rows], "o-", label=METRIC_LABELS[name])
        ax.set_xlabel("background threshold")
        ax.set_ylabel("mIoU (%)")
        ax.legend()
        out["sweep"] = _png(fig)
    per_class = {k: v["per_class_iou"] for k, v in report["metrics"].items() if isinstance(v, dict) and "per_class_iou" in v}
    if per_class:
        classes = list(next(iter(per_class.values())))
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(classes) + 2), 3.4))
        width = 0.8 / len(per_class)
        for j, (name, ious) in enumerate(per_class.items()):
            ax.bar([i + j * width for i in range(len(classes))], [ious.get(c) or 0 for c in classes], width,
                   label=METRIC_LABELS.get(name, name))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, rotation=30, ha="right")
        ax.set_ylabel("IoU (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
        out["per_class"] = _png(fig)
    by_size = {k: v["errors"]["recall_by_size"] for k, v in report["metrics"].items()
               if isinstance(v, dict) and isinstance(v.get("errors"), dict) and v["errors"].get("recall_by_size")}
    if by_size:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        sizes = list(next(iter(by_size.values())))
        for name, rec in by_size.items():
            ax.plot(range(len(sizes)), [float("nan") if rec.get(sz) is None else rec[sz] for sz in sizes], "o-",
                    label=METRIC_LABELS.get(name, name))
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("object's share of the photo")
        ax.set_ylabel("recall (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        out["by_size"] = _png(fig)
    return out


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page (no external files, no scripts)."""
    e = html.escape
    def secs(s: dict) -> str:
        return "" if s["seconds"] is None else f"{s['seconds']:.1f}"

    rows = "".join(f"<tr><td>{e(s['stage'])}</td><td>{e(s['folder'])}</td><td class=n>{secs(s)}</td>"
                   f"<td>{e(s['finished'] or '')}</td></tr>" for s in report["stages"])
    mrows = "".join(f"<tr><td>{e(METRIC_LABELS.get(k, k))}</td><td>{e(_metric_text(k, v))}</td></tr>"
                    for k, v in report["metrics"].items() if k in METRIC_LABELS)
    if "ratio" in report["metrics"]:
        mrows += f"<tr><td>weakly / fully</td><td>ratio {report['metrics']['ratio']:.3f}</td></tr>"
    warn = "".join(f"<p class=warn>Warning: {e(w)}</p>" for w in report.get("warnings", []))
    ran_eval = any(st["stage"] == "eval" for st in report["stages"])
    unscored = "nothing scored (no ground truth)" if ran_eval else "nothing scored yet: the eval stage has not run"
    plots = _plots(report)
    titles = {"curves": "Training curves", "sweep": "Background-threshold sweep", "per_class": "Per-class IoU",
              "by_size": "Recall by object size (every pixel scored)"}
    figs = "".join(f"<h2>{titles[k]}</h2><img alt='{titles[k]}' src='data:image/png;base64,{v}'>" for k, v in plots.items())
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>wsss run {e(report['run'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}td.n{{text-align:right}}img{{max-width:100%}}.warn{{background:#fff3cd;border:1px solid #e0a800;padding:.5em}}</style></head>
<body><h1>wsss run <code>{e(report['run'])}</code></h1>
{warn}<h2>Results</h2><table><tr><th>output</th><th>score</th></tr>{mrows or f'<tr><td colspan=2>{unscored}</td></tr>'}</table>
<h2>Stages</h2><table><tr><th>stage</th><th>folder</th><th>seconds</th><th>finished</th></tr>{rows}</table>
{figs}</body></html>"""


def write_report(run_dir: str | Path, seg_folder: str = "seg", split: str = "val") -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; returns the report."""
    run_dir = Path(run_dir)
    report = collect(run_dir, seg_folder, split)
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.html", render_html(report))
    return report
