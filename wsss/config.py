"""Typed configuration: YAML in, validated objects out, unknown keys rejected by name.

A config file is a YAML mapping with one section per stage. ``key.sub=value`` overrides (values
parsed as YAML, so ``1e-3``, ``[1, 0.5]`` and ``true`` work) are applied before validation, so
an override with a typo is rejected just like a typo in the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsss.errors import ConfigError
from wsss.io import write_text


class Section(BaseModel):
    """Base for every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

SYNTH_CLASSES = ("stripes", "checker", "dots", "rings")


class SynthConfig(Section):
    """The built-in synthetic dataset (see ``wsss.data.synth`` for its design)."""

    n_train: int = Field(600, ge=1, description="number of training images")
    n_val: int = Field(150, ge=1, description="number of validation images")
    size: int = Field(128, ge=48, le=1024, description="image side in pixels (square)")
    classes: list[str] = Field(default_factory=lambda: list(SYNTH_CLASSES), min_length=1, max_length=8)
    max_objects: int = Field(3, ge=1, le=6, description="most objects in one image")
    clutter: int = Field(8, ge=0, le=100, description="number of distractor shapes in the background")
    part_frac: float = Field(0.18, gt=0.02, lt=0.6, description="discriminative part area / object area")
    object_radius: tuple[float, float] = Field((0.17, 0.27), description="object body radius range, as a fraction of the image side")
    texture_period: float = Field(6.0, ge=2.0, le=64.0, description="period of the class textures (pixels)")
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        _check_class_names(v)
        return v


def _check_scales(v: list[float]) -> list[float]:
    if any(s <= 0 or s > 8 for s in v):
        raise ValueError(f"scales must be in (0, 8], got {v}")
    return v


def _check_class_names(names: Sequence[str]) -> None:
    seen = set()
    for n in names:
        if not n or any(c.isspace() for c in n) or n == "background":
            raise ValueError(f"invalid class name {n!r} (no spaces; 'background' is implicit)")
        if n in seen:
            raise ValueError(f"class {n!r} listed twice")
        seen.add(n)


class DataConfig(Section):
    """Where the images and image-level labels come from."""

    source: Literal["synth", "voc", "coco", "csv"] = "synth"
    root: Path | None = Field(None, description="VOC folder, COCO folder (annotations/instances_<split>.json + <split>/) or "
                              "CSV file; for synth, where to write (default RUN/data)")
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = Field(0.0, ge=0, lt=1, description="carve this share of the training images out as the val split "
                                "(chosen by a hash of each image id: stable as images are added) when the dataset has no "
                                "val split of its own (a CSV manifest without a split column)")
    classes: list[str] | None = Field(None, description="foreground class names, overrides classes.txt")
    synth: SynthConfig = Field(default_factory=SynthConfig)

    @model_validator(mode="after")
    def _root_needed(self) -> "DataConfig":
        if self.source != "synth" and self.root is None:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        if self.classes is not None:
            _check_class_names(self.classes)
        return self


class TrainCommon(Section):
    """Settings shared by the two training stages (classifier and segmenter)."""

    backbone: str = Field("tiny", description="registered backbone name (see `wsss.models.BACKBONES`)")
    pretrained: bool | str = Field(False, description="ImageNet weights: true (packaged/cached), false, or a .pth path")
    output_stride: Literal[8, 16, 32] = Field(16, description="feature stride; 16 dilates the last stage")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, description="backbone learning rate (poly decay, power 0.9)")
    head_lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the new head")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(0, ge=0, description="linear warm-up iterations before poly decay")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="keep an exponential moving average of the weights with this "
                             "decay per step and save it instead of the last weights (0 = off)")
    crop_size: int = Field(128, ge=16, description="training crop side (pixels)")
    resize_long: int | None = Field(None, ge=16, description="resize the long side to this before augmenting")
    scale_range: tuple[float, float] = Field((0.7, 1.3), description="random rescale range")
    hflip: bool = True
    color_jitter: float = Field(0.3, ge=0, le=1)
    freeze_bn: bool = Field(False, description="keep the backbone's BatchNorm statistics and affine parameters fixed")
    freeze_stem: bool = Field(False, description="do not train the backbone's stem")
    workers: int = Field(0, ge=0, description="data-loading worker processes (0 = in the main process)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    channels_last: bool | None = Field(None, description="NHWC memory layout; default: the backbone's preference")
    sync_bn: bool = Field(False, description="under torchrun: synchronise batch-norm statistics across GPUs (CUDA only)")

    @field_validator("scale_range")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {list(v)}")
        return v


class TrainClsConfig(TrainCommon):
    """Stage 1: the multi-label classifier trained from image-level labels."""

    dropout: float = Field(0.0, ge=0, lt=1)


class TrainSegConfig(TrainCommon):
    """Stage 5: a segmenter (DeepLab v2/v3/v3+, FCN, U-Net, HRNet head) trained on the pseudo-masks (or, as the
    fully-supervised reference, on the ground-truth masks). ``backbone``/``output_stride`` apply to every
    segmenter but the torchvision ones (``tv_*``), which fix their own."""

    arch: str = Field("deeplabv3", description="registered segmenter: deeplabv3, deeplabv3plus, deeplabv2, deeplabv2_largefov, "
                      "fcn, fcn_skip, unet, hrnet, tv_* (see `wsss.models.segmenter.SEGMENTERS`)")
    masks: Literal["pseudo", "gt"] = Field("pseudo", description="pseudo: the crf stage's masks (or mask_dir); "
                                           "gt: the ground truth (the fully-supervised upper bound)")
    mask_dir: Path | None = Field(None, description="pseudo-mask folder to train on (default RUN/crf)")
    channels: int | None = Field(None, ge=8, description="ASPP/head channels (default: 256 for v3, 1024 for v2 LargeFOV)")
    rates: list[int] | None = Field(None, description="atrous rates (default: the paper's, rescaled to output_stride)")
    head_dropout: float | None = Field(None, ge=0, lt=1, description="dropout in the head (default: the paper's)")
    decoder_channels: list[int] | None = Field(None, description="unet: decoder widths, deepest first, one per backbone "
                                               "level (default 256, 128, 64, ... down to 16)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.002, gt=0, description="backbone learning rate (poly decay, power 0.9); 0.01 with the head at "
                      "10x did not learn on voc6")
    head_lr_mult: float = Field(5.0, gt=0, description="learning-rate multiplier of the new head")
    crop_size: int = Field(256, ge=16, description="training crop side (pixels)")
    scale_range: tuple[float, float] = Field((0.5, 1.5), description="random rescale range")
    color_jitter: float = Field(0.0, ge=0, le=1)
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision: bf16 on CUDA or CPU (fast on CPUs "
                                                 "with native bf16: AVX512-BF16, AMX), fp16 on CUDA only (ignored on CPU)")
    eval_every: int = Field(1, ge=0, description="score the val split every N epochs when it has masks (0 = never)")
    loss_drop: float = Field(0.0, ge=0, lt=1, description="label-noise tolerance: leave this share of each class's labelled "
                             "pixels in a batch with the largest loss out of the loss (0 = plain cross-entropy)")

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(r < 1 for r in v)):
            raise ValueError(f"rates must be positive integers, got {v}")
        return v

    def head_options(self) -> dict:
        """Keyword arguments for the head (only those set)."""
        out: dict = {}
        if self.channels is not None:
            out["channels"] = self.channels
        if self.rates is not None:
            out["rates"] = list(self.rates)
        if self.head_dropout is not None:
            out["dropout"] = self.head_dropout
        if self.decoder_channels is not None:
            out["decoder_channels"] = list(self.decoder_channels)
        return out


class PredictConfig(Section):
    """`wsss predict`: the segmenter on a split, an image or a folder."""

    split: str = Field("val", description="dataset split predicted by `wsss run` and `wsss predict CONFIG`")
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1, description="inference scales (averaged)")
    flip: bool = Field(True, description="also average the mirrored image")
    resize_long: int | None = Field(None, ge=16, description="long side the network sees at scale 1 (default: train_seg.resize_long)")
    crf: bool = Field(False, description="refine predictions with the dense CRF (the crf section's kernels)")
    labels_only: bool = Field(False, description="a dataset split: each photo may only hold background and its image-level "
                              "labels (the self-training flow predicts the train split this way)")
    exclusive_below: float | None = Field(
        None, ge=0, le=1, description="class exclusion: a class that wins fewer pixels than another class it shares "
        "under this share of training photos with (of the rarer one's) is dropped from the photo, its pixels going to "
        "the rest before the CRF (counts from the training labels, stored in segmenter.pt); null: off")
    overlay: bool = Field(True, description="also write overlays (photo blended with the mask colours) as JPEG")
    batch_size: int = Field(4, ge=1, description="same-size images per forward pass")
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision: bf16 on CUDA or CPU (fast on CPUs "
                                                 "with native bf16: AVX512-BF16, AMX), fp16 on CUDA only (ignored on CPU)")

    _scales = field_validator("scales")(classmethod(lambda cls, v: _check_scales(v)))


class CamConfig(Section):
    """Stage 2: class activation maps of each image's labelled classes."""

    method: str = Field("cam", description="registered CAM method (see `wsss.cam.CAM_METHODS`)")
    target_layer: str = Field("features", description="gradient methods: 'features' or a module path such as backbone.layer3")
    scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0], min_length=1)
    flip: bool = True
    resize_long: int | None = Field(None, ge=16, description="run the network with the long side resized to this")
    split: str = Field("train", description="which split to extract (seeds are judged on train)")
    batch_size: int = Field(8, ge=1, description="same-size images grouped together")
    batch_pixels: int = Field(250_000, ge=1, description="most input pixels per forward pass (a group's passes are "
                                                          "split to fit; on CPU large passes run slower per pixel)")
    fold_bn: bool = Field(True, description="fold batch norm into the convolutions for extraction (same maps, faster)")
    max_side: int | None = Field(1024, ge=64, description="photos with a longer side are extracted at this long side and the "
                                 "maps resized to the photo (bounds memory per image); null = no cap")
    device: str = "auto"
    channels_last: bool | None = Field(None, description="NHWC memory layout; default: the backbone's preference")
    refine: Literal["none", "prototype"] = Field(
        "none", description="prototype: each image's maps re-scored by its own feature prototypes (SIPE; the cam and "
                            "expand stages both apply it; needs a backbone with multi-level features)")
    prototype_fg: float = Field(0.5, ge=0, le=1, description="refine=prototype: a class's seed cells are where its map is the largest and above this")
    prototype_bg: float = Field(0.15, ge=0, le=1, description="... and the background's where every map is below this")

    _scales = field_validator("scales")(classmethod(lambda cls, v: _check_scales(v)))

    @model_validator(mode="after")
    def _check_prototype(self) -> "CamConfig":
        if self.prototype_bg > self.prototype_fg:
            raise ValueError(f"prototype_bg ({self.prototype_bg}) must not exceed prototype_fg ({self.prototype_fg})")
        return self


class ErasingConfig(Section):
    """Adversarial erasing: per round, erase where the merged maps exceed ``threshold``, fine-tune, re-extract."""

    rounds: int = Field(2, ge=1, le=10)
    threshold: float = Field(0.5, gt=0, le=1, description="erase pixels whose max-normalised map of a labelled class exceeds this")
    stop_score: float = Field(0.5, ge=0, le=1, description="guard: a round's map of a class is merged only where the "
                                                           "fine-tuned classifier still scores the erased image >= this")


class HideAndSeekConfig(Section):
    grid: int = Field(4, ge=2, le=32, description="patches per side")
    prob: float = Field(0.5, ge=0, lt=1, description="probability of hiding each patch")


class ACoLConfig(Section):
    threshold: float = Field(0.6, gt=0, lt=1, description="head A's normalised map above this is erased for head B")


class MultiDilatedConfig(Section):
    rates: list[int] = Field(default_factory=lambda: [3, 6, 9], min_length=1, description="dilation rates of the extra 3x3 heads "
                             "(Wei et al. 2018 use 3, 6, 9 at stride 8)")


class ReCAMConfig(Section):
    weight: float = Field(0.1, ge=0, description="weight of the softmax cross-entropy on CAM-weighted features (voc6 train, "
                          "3 fine-tune epochs: 0.1 gave +3.5 CAM mIoU over the plain control; 1.0 diverged)")


class MixupConfig(Section):
    alpha: float = Field(1.0, gt=0, description="mixing weight ~ Beta(alpha, alpha)")
    entropy_weight: float = Field(0.05, ge=0, description="weight of the per-pixel class entropy term")
    concentration_weight: float = Field(0.0, ge=0, description="weight of the feature concentration term")


class EquivariantConfig(Section):
    scale: float = Field(0.5, gt=0.1, lt=1, description="the second view is the training crop rescaled by this")
    weight: float = Field(1.0, ge=0, description="weight of the equivariance term (L1 of max-normalised maps "
                                                 "+ the second view's classification loss)")


class ExpandConfig(Section):
    """Stage 3: fine-tune the stage-1 classifier with expansion methods and extract new maps (same
    settings as `cam`)."""

    enabled: bool = Field(True, description="run this stage in `wsss run` (crf then reads the plain CAMs when off)")
    methods: list[str] = Field(default_factory=lambda: ["hide_and_seek"], min_length=1, description="registered expansion "
                               "methods (see `wsss.expand.EXPAND_METHODS`); 'plain' = fine-tuning alone, the control")
    epochs: int = Field(3, ge=1, description="fine-tuning epochs (per round for erasing)")
    lr: float | None = Field(None, gt=0, description="fine-tuning learning rate; default train_cls.lr / 2")
    merge_seed: bool = Field(False, description="also merge (max) the stage-2 maps into the output")
    erasing: ErasingConfig = Field(default_factory=ErasingConfig)
    hide_and_seek: HideAndSeekConfig = Field(default_factory=HideAndSeekConfig)
    acol: ACoLConfig = Field(default_factory=ACoLConfig)
    mixup: MixupConfig = Field(default_factory=MixupConfig)
    equivariant: EquivariantConfig = Field(default_factory=EquivariantConfig)
    multi_dilated: MultiDilatedConfig = Field(default_factory=MultiDilatedConfig)
    recam: ReCAMConfig = Field(default_factory=ReCAMConfig)


class CrfConfig(Section):
    """Stage 4: dense CRF over each image's labelled classes plus background -> palette PNG pseudo-masks.

    Defaults follow the common WSSS settings (IRN/AffinityNet): 10 mean-field iterations, a smoothness
    kernel of 3 px, an appearance kernel of 50 px / 5 colour levels.
    """

    source: Literal["auto", "cam", "expand"] = Field("auto", description="CAMs to refine; auto: expand when the run has it, else cam")
    mode: Literal["probability", "confidence"] = Field("confidence", description="probability: one CRF, every pixel labelled; "
                                                       "confidence: two CRFs, 255 where they disagree")
    unary: Literal["soft", "labels"] = Field("soft", description="soft: -log of the normalised scores; "
                                             "labels: the arg-max label held with probability gt_prob")
    gt_prob: float = Field(0.7, gt=0, lt=1, description="labels unary: confidence in the arg-max label")
    bg_score: Literal["threshold", "power"] = Field("threshold", description="probability mode: background score is "
                                                    "bg_threshold, or (1 - max cam) ** alpha")
    bg_threshold: float = Field(0.2, ge=0, le=1, description="probability mode, bg_score=threshold")
    alpha: float = Field(4.0, gt=0, description="probability mode, bg_score=power")
    fg_threshold: float = Field(0.30, ge=0, le=1, description="confidence mode: background score of the foreground-confident pass")
    low_threshold: float = Field(0.05, ge=0, le=1, description="confidence mode: background score of the background-confident pass")
    iterations: int = Field(10, ge=1, le=100, description="mean-field iterations")
    gaussian_sxy: float = Field(3.0, gt=0, description="smoothness kernel width (px)")
    gaussian_compat: float = Field(3.0, ge=0, description="smoothness kernel weight")
    bilateral_sxy: float = Field(50.0, gt=0, description="appearance kernel width (px)")
    bilateral_srgb: float = Field(5.0, gt=0, description="appearance kernel colour width (0-255 levels)")
    bilateral_compat: float = Field(10.0, ge=0, description="appearance kernel weight")
    workers: int = Field(0, ge=0, description="worker processes; 0 = one per CPU core")
    max_side: int | None = Field(1024, ge=64, description="photos with a longer side are refined at this long side and the "
                                 "mask resized to the photo (bounds memory per image); null = no cap")
    thresholds: Literal["manual", "auto"] = Field("manual", description="confidence mode: manual = fg_threshold and "
                                                  "low_threshold as set; auto = chosen from the CAMs of the split alone "
                                                  "(two-level Otsu of their values; no mask is read)")
    auto_images: int = Field(200, ge=1, description="thresholds=auto: the maps of this many images (evenly spread) are pooled")
    sweep: dict[str, list[float]] = Field(
        default_factory=lambda: {"fg_threshold": [0.2, 0.25, 0.3, 0.35, 0.4], "low_threshold": [0.05, 0.1, 0.15]},
        description="`wsss crf --sweep`: values to try per key (every combination)")
    sweep_images: int = Field(100, ge=1, description="`wsss crf --sweep`: first N labelled images scored")
    sweep_min_kept: float = Field(0.85, ge=0, le=1, description="`wsss crf --sweep`: best = highest score keeping at least this share")
    sweep_score: Literal["kept_pixels", "every_pixel"] = Field(
        "kept_pixels", description="`wsss crf --sweep`: the score the best setting maximises; kept_pixels = mIoU on the pixels "
        "the masks keep, every_pixel = mIoU with ignored pixels counted as background (penalises leaving pixels out)")

    @model_validator(mode="after")
    def _check(self) -> "CrfConfig":
        if self.mode == "confidence" and self.low_threshold > self.fg_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not exceed fg_threshold ({self.fg_threshold})")
        bad = sorted(set(self.sweep) - set(type(self).model_fields) - {"sweep"})
        if bad or "sweep" in self.sweep:
            raise ValueError(f"sweep keys must be crf settings, got {', '.join(bad or ['sweep'])}")
        return self


class _FinalCrf(Section):
    """A stage that refines its own maps with the CRF in confidence mode at its own ``fg_threshold`` /
    ``low_threshold`` (fields the subclass declares, with its own defaults and place in the section)."""

    def crf_settings(self, crf: CrfConfig) -> CrfConfig:
        """The CRF on this stage's maps: ``crf``'s kernels, confidence mode, this section's thresholds."""
        return crf.model_copy(update={"mode": "confidence", "fg_threshold": self.fg_threshold, "low_threshold": self.low_threshold})

    @model_validator(mode="after")
    def _thresholds(self) -> "_FinalCrf":
        if self.low_threshold > self.fg_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) must not exceed fg_threshold ({self.fg_threshold})")
        return self


class SegMapsConfig(_FinalCrf):
    """Stage 4a': maps from a segmenter. A segmenter (``train_seg``'s architecture and optimiser, this
    section's epochs) is trained on the crf stage's pseudo-masks; its class probabilities on the train
    photos, restricted to each photo's labels, become the maps, refined by the CRF (the ``crf`` section's
    kernels, this section's thresholds) into new pseudo-masks. Trained per pixel across the whole set, the
    segmenter marks the parts of an object the CAMs leave out (a large dog's body, not just its head).
    The affinity stage then learns from and walks these masks and maps instead of the crf stage's."""

    enabled: bool = Field(False, description="run this stage in `wsss run` (affinity, or train-seg without it, reads RUN/segmaps)")
    epochs: int = Field(4, ge=1, description="training epochs of the segmenter (the rest of its settings: the train_seg section)")
    train_resize_long: int | None = Field(None, ge=16, description="long side of the photos the segmenter trains on "
                                                                   "(default: train_seg.resize_long)")
    crop_size: int | None = Field(None, ge=16, description="its training crop side (default: train_seg.crop_size)")
    scales: list[float] = Field(default_factory=lambda: [0.75, 1.0, 1.25], min_length=1,
                                description="inference scales (relative to the segmenter's training long side), averaged")
    flip: bool = Field(True, description="also average the mirrored photo")
    resize_long: int | None = Field(None, ge=16, description="long side the network sees at scale 1 when mapping "
                                                             "(default: the segmenter's training long side)")
    merge_cams: bool = Field(False, description="maps: per pixel and class the larger of the segmenter's and the CAMs "
                                                "the crf stage read (gives back small objects the segmenter misses)")
    fg_threshold: float = Field(0.3, ge=0, le=1, description="CRF confidence mode on the maps: background score of the foreground pass")
    low_threshold: float = Field(0.1, ge=0, le=1, description="... and of the background pass (between the two: 255)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    def segmenter_settings(self, train_seg: "TrainSegConfig") -> "TrainSegConfig":
        """``train_seg`` with this section's epochs, input sizes and device, never scoring val (the maps are for
        train)."""
        update = {"epochs": self.epochs, "device": self.device, "eval_every": 0}
        if self.train_resize_long is not None:
            update["resize_long"] = self.train_resize_long
        if self.crop_size is not None:
            update["crop_size"] = self.crop_size
        return train_seg.model_copy(update=update)

    @model_validator(mode="after")
    def _check(self) -> "SegMapsConfig":
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")
        return self


class AffinityConfig(_FinalCrf):
    """Stage 4b: learn pixel affinities from the confident CRF pseudo-masks and random-walk the maps
    along them (AffinityNet), then refine the walked maps with the CRF (the ``crf`` section's kernels,
    this section's thresholds) into the pseudo-masks that train-seg uses."""

    enabled: bool = Field(False, description="run this stage in `wsss run` (train-seg then reads RUN/affinity/masks)")
    epochs: int = Field(2, ge=1, description="training epochs of the affinity head (the backbone stays frozen)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (poly decay)")
    width: int = Field(64, ge=4, description="channels per feature level in the head (a multiple of 4)")
    dim: int = Field(128, ge=1, description="embedding channels")
    min_share: float = Field(0.75, gt=0, le=1, description="a stride-8 cell is labelled when this share of its pixels agree")
    radius: int = Field(5, ge=1, le=12, description="pairs within this many stride-8 cells (training and walk)")
    beta: float = Field(16.0, gt=0, description="the walk uses affinity ** beta (sharper edges)")
    steps: int = Field(256, ge=1, description="random-walk steps")
    normalise: Literal["class", "image"] = Field(
        "class", description="walked maps divided by each class's own maximum, or all by the image's largest (IRN)")
    fg_threshold: float = Field(0.5, ge=0, le=1, description="CRF confidence mode on the walked maps: background score of the foreground pass")
    low_threshold: float = Field(0.3, ge=0, le=1, description="... and of the background pass (between the two: 255)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _check(self) -> "AffinityConfig":
        if self.width % 4:
            raise ValueError(f"width must be a multiple of 4 (GroupNorm with 4 groups), got {self.width}")
        return self


class EvalConfig(Section):
    """Scoring against ground truth (never read by weakly-supervised stages)."""

    thresholds: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)], min_length=1)

    @field_validator("thresholds")
    @classmethod
    def _ths(cls, v: list[float]) -> list[float]:
        if any(not 0 <= t <= 1 for t in v):
            raise ValueError(f"thresholds must be in [0, 1], got {v}")
        return sorted(v)


class RunConfig(Section):
    """Where a run writes its outputs, and its global seed."""

    out_dir: Path = Path("runs/demo")
    seed: int = 0
    name: str = "demo"
    gallery_images: int = Field(100, ge=0, description="`wsss run` ends with a gallery of this many images (0 = none)")


class AblationConfig(Section):
    """The ablation flow (`wsss run CONFIG --flow ablation`): expansion and CRF variants on one run's
    classifier and CAMs, tabulated. Scores against ground truth, so the split needs masks."""

    variants: list[str] = Field(default_factory=lambda: ["plain", "erasing", "hide_and_seek", "acol", "mixup", "equivariant",
                                                         "multi_dilated", "recam"], min_length=1,
                                description="expansion variants: a registered method, or methods joined with + "
                                            "(e.g. hide_and_seek+acol); 'plain' = fine-tuning alone, the control")
    combine_best: bool = Field(True, description="also run the combination of the two single methods with the best CAM mIoU")
    crf_modes: list[Literal["probability", "confidence"]] = Field(default_factory=lambda: ["confidence", "probability"],
                                                                   description="CRF modes applied to every variant's maps (other CRF settings: `crf`)")
    images: int | None = Field(None, ge=1, description="extract and score only the first N images of `cam.split` (by id); "
                                                       "null = all")
    finetune_all: bool = Field(True, description="fine-tune on all of `cam.split`, as `wsss expand` does, even when `images` "
                                                 "limits the scored images; false: fine-tune on those images only (faster, weaker)")


class Config(Section):
    """The whole pipeline configuration; one section per stage."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train_cls: TrainClsConfig = Field(default_factory=TrainClsConfig)
    cam: CamConfig = Field(default_factory=CamConfig)
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    crf: CrfConfig = Field(default_factory=CrfConfig)
    segmaps: SegMapsConfig = Field(default_factory=SegMapsConfig)
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    train_seg: TrainSegConfig = Field(default_factory=TrainSegConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)


# --------------------------------------------------------------------------------------------------
# loading, overrides, hashing


def _override_for(loc: str, overrides: dict[str, str]) -> str | None:
    """The command-line override that set config key ``loc`` (or a section above it), if one did."""
    keys = [k for k in overrides if loc == k or loc.startswith(k + ".")]
    return overrides[max(keys, key=len)] if keys else None


def _format_validation_error(err: ValidationError, model: type[BaseModel], overrides: dict[str, str] | None = None) -> tuple[str, bool]:
    """One line for every problem, and whether all of them came from command-line overrides (then the
    file is not to blame)."""
    parts, from_overrides = [], True
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        item = _override_for(loc, overrides or {})
        from_overrides = from_overrides and item is not None
        blame = f"override {item}: " if item else ""
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, e["loc"][:-1])
            hint = f" (valid keys here: {', '.join(valid)})" if valid else ""
            parts.append(f"{blame}unknown config key '{loc}'{hint}")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            where = f"config key '{loc}'" if loc else "config"
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            parts.append(f"{blame}{where}: {msg}{shown}")
    return "; ".join(parts), from_overrides


def _valid_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    cur: Any = model
    for key in loc:
        fields = getattr(cur, "model_fields", None)
        if not fields or key not in fields:
            return []
        cur = fields[key].annotation
    fields = getattr(cur, "model_fields", None)
    return sorted(fields) if fields else []


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    out = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base_dir: Path | None = None) -> Config:
    """Load a YAML config (or defaults when ``path`` is None), apply overrides and validate.

    Relative ``data.root`` and ``run.out_dir`` stay relative to the current directory, as users
    expect from a command line.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            reason = getattr(e, "problem", None)
            raise ConfigError(f"invalid YAML{where}" + (f": {reason}" if reason else ""), p) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("top level of a config must be a mapping of sections", p)
        raw = loaded
    raw = apply_overrides(raw, overrides)
    given = {item.partition("=")[0].strip(): item for item in overrides}
    return config_from_dict(raw, source=path, overrides=given)


def config_from_dict(raw: dict[str, Any], source: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Validate ``raw``; an error names the override that set a bad key (``overrides``: key -> the
    ``key=value`` given), else ``source``."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        message, from_overrides = _format_validation_error(e, Config, overrides)
        raise ConfigError(message, None if from_overrides else source) from None


#: Settings added after runs already existed, whose default reproduces the old behaviour: left out of
#: dumps (and so of stage hashes) while at that default, so adding them does not invalidate finished stages.
NEUTRAL_DEFAULTS: dict[str, Any] = {"sync_bn": False, "loss_drop": 0.0, "ema_decay": 0.0, "decoder_channels": None, "labels_only": False}


def _drop_neutral(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_neutral(v) for k, v in obj.items() if not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    return obj


def config_to_dict(section: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config object (paths as strings; neutral defaults left out)."""
    return _drop_neutral(section.model_dump(mode="json"))


def config_hash(obj: Any) -> str:
    """Stable short hash of a config section or any JSON-compatible object."""
    if isinstance(obj, BaseModel):
        obj = config_to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
