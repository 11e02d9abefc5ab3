"""Training-step cost of backbones, measured side by side in one run (ratios, not absolute times).

For each backbone: one SGD step (forward, loss, backward, update) of the stage-1 classifier (batch 16,
256 x 256 crops, as ``configs/voc6_lite0_60min.yaml``) and of the DeepLab v3 segmenter (batch 8, 256 x
256, output stride 16). The backbones take turns, ``--rounds`` times ``--steps`` steps each, so a slow
spell of a shared machine hits all of them alike; the median per-step time of each is reported with
its ratio to the first backbone. Random weights and inputs: the cost does not depend on them.
``--amp none bf16`` times each backbone in each precision (``wsss.engine.core.autocast``, as the
segmenter's ``train_seg.amp`` runs it), and adds the segmenter's forward pass at prediction (batch 2,
``--predict-size`` square, inference mode).

    python benchmarks/backbone_speed.py --backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
    python benchmarks/backbone_speed.py --backbones efficientnet_lite0 --amp none bf16 --crop 320
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from wsss.engine.core import autocast, set_train_mode
from wsss.inference import prepare_model
from wsss.models import Classifier, create_backbone
from wsss.models.segmenter import create_segmenter


def _train_step(model: torch.nn.Module, stem: list, x: torch.Tensor, y: torch.Tensor, loss, amp: str = "none"):
    """One SGD step of ``model`` on the fixed batch ``x``, ``y``, trained as the recipe trains it (in ``amp``)."""
    model = model.to(memory_format=torch.channels_last)
    set_train_mode(model, model.backbone, stem, True, True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), amp):
            value = loss(model(x).float(), y)
        value.backward()
        opt.step()
    return step


def _classifier_step(name: str, batch: int, crop: int, amp: str):
    model = Classifier(create_backbone(name, pretrained=False, output_stride=16), num_classes=6)
    return _train_step(model, model.backbone.stem_modules(), torch.randn(batch, 3, crop, crop),
                       (torch.rand(batch, 6) > 0.5).float(), F.binary_cross_entropy_with_logits, amp)


def _segmenter_step(name: str, batch: int, crop: int, amp: str):
    model = create_segmenter("deeplabv3", num_classes=7, pretrained=False, backbone=name, output_stride=16)
    return _train_step(model, model.stem_modules(), torch.randn(batch, 3, crop, crop),
                       torch.randint(0, 7, (batch, crop, crop)), F.cross_entropy, amp)


def _segmenter_forward(name: str, batch: int, size: int, amp: str):
    """The segmenter's forward pass as prediction runs it (eval mode, inference mode, channels-last)."""
    model = prepare_model(create_segmenter("deeplabv3", num_classes=7, pretrained=False, backbone=name, output_stride=16),
                          torch.device("cpu"))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), autocast(torch.device("cpu"), amp):
            model(x)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    ap.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"], help="precisions to time each backbone in")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--predict-size", type=int, default=560, help="with several --amp: the forward pass's square input side")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)

    entries = [(b, a) for b in args.backbones for a in args.amp]
    label = {e: e[0] if len(args.amp) == 1 else f"{e[0]} {e[1]}" for e in entries}
    kinds = [("classifier", _classifier_step, 16, args.crop), ("segmenter", _segmenter_step, 8, args.crop)]
    if len(args.amp) > 1:
        kinds.append(("segmenter forward", _segmenter_forward, 2, args.predict_size))
    results = {}
    for kind, make, batch, size in kinds:
        steps = {e: make(e[0], batch, size, e[1]) for e in entries}
        for fn in steps.values():  # warm-up: allocator and kernel selection
            fn()
        times: dict[tuple[str, str], list[float]] = {e: [] for e in entries}
        for _ in range(args.rounds):
            for e, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[e].append((time.perf_counter() - t0) / args.steps)
        base = statistics.median(times[entries[0]])
        results[kind] = {label[e]: {"median_s": round(statistics.median(t), 4),
                                    "ratio": round(statistics.median(t) / base, 3)} for e, t in times.items()}
        print(f"{kind} (batch {batch}, {size}x{size}), median seconds per step, ratio to {label[entries[0]]}:")
        for name, r in results[kind].items():
            print(f"  {name:29s} {r['median_s']:.3f}  x{r['ratio']:.2f}")
    print(f"threads: {torch.get_num_threads()}, rounds {args.rounds} x {args.steps} steps, interleaved")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
