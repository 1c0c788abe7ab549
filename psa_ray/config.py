"""One config dataclass per stage. Defaults are the `paper` preset: the recipe of jiwoon-ahn/psa,
the reference code of the paper (Ahn & Kwak, CVPR 2018), where the code and the paper's text
differ (alpha_high 32, not 24) and where the text is silent (crops, rates, frozen layers);
docs/fidelity.md lists every setting with psa's value and its source.

`PRESETS["demo"]` shrinks what must shrink to label the built-in synthetic corpus on a 2-core
CPU in minutes; everything not named there keeps the paper preset's value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF (Kraehenbuehl & Koltun): psa's parameters for the seeds (tool/imutils.py
    crf_inference); the paper, not psa's code, also refines the walked labels with a CRF, here
    with the same parameters."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


@dataclass(frozen=True)
class CamConfig:
    """Stage B: multi-scale CAM inference and confident seed labels."""

    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    flip: bool = True
    # the scales apply to the image upscaled so that its short side is at least min_side (0: as it
    # is): an ImageNet network's CAMs on small images are blobs (bench/README.md, "Pretrained backbones")
    min_side: int = 0
    alpha_low: float = 4.0    # background power for confident foreground
    alpha_high: float = 32.0  # background power for confident background (psa's code; its paper: 24)
    crf: CrfConfig = field(default_factory=CrfConfig)
    # "pil_bicubic": each scale resized from the uint8 image with PIL bicubic, as psa;
    # "bilinear": F.interpolate of the normalised tensor (on the device, no antialias)
    resample: str = "pil_bicubic"
    # True: seeds/<id>.png keeps the low/high-alpha CRF scores (io/seeds.py), from which
    # AffinityNet's labels are cell-averaged after the crop, as psa; False: a hard seed label map
    seed_scores: bool = True


@dataclass(frozen=True)
class WalkConfig:
    """Stage D: random walk over AffinityNet's affinities, then a dense CRF."""

    radius: int = 5         # gamma, on the stride-8 feature grid
    beta: float = 8.0       # W = A ** beta
    t: int = 256            # number of walk steps (the reference computes T^(2^logt), logt = 8)
    alpha: float = 16.0     # background power of the CAM before the walk
    min_side: int = 0       # walk images upscaled to this short side at least (0: as they are)
    cam_weight: float = 0.0  # the final CRF's input: (1 - w) walked + w CAM scores (psa: 0)
    crf: CrfConfig = field(default_factory=CrfConfig)


@dataclass(frozen=True)
class TrainConfig:
    """One network's training run (CAM net, AffinityNet or DeepLab)."""

    backbone: str = "resnet38d"
    backbone_weights: str | None = None  # path or s3:// URI; None trains from scratch
    epochs: int = 15
    batch_size: int = 8                  # global batch size, split over workers
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    new_layer_lr_mult: float = 10.0      # classifier / new heads learn 10x faster
    poly_power: float = 0.9
    crop_size: int = 448
    resize_long: tuple[int, int] | None = (256, 512)  # None: no rescale (crop of the native image)
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    num_workers: int = 1
    use_gpu: bool = False
    mixed_precision: bool = True         # bf16 autocast on GPU only
    checkpoint_every_epochs: int = 1
    seed: int = 0
    # rows each worker shuffles per epoch, seeded by (seed, epoch, rank), as psa's shuffling
    # DataLoader: a buffer of this many decoded rows (0: the rows in the dataset's order)
    shuffle_rows: int = 1024
    # a backbone that starts from weights (backbone_weights, or another network's backbone)
    # keeps every BatchNorm in eval mode with gamma/beta frozen, and its stem frozen
    # (`stem_modules` of models/backbones.py), as psa; from scratch everything trains
    freeze_pretrained: bool = True
    segmentation_head: str = "largefov"  # DeepLab's head: "largefov" (v1, psa) or "aspp" (v2)
    # weights and batches in channels-last memory format (on a CPU 10x faster for EfficientNet's
    # depthwise convolutions above 160 px; bench/README.md)
    channels_last: bool = True
    # torch threads of each training worker: 0 Ray's (one per CPU it asked for); -1 every core of
    # its machine (a laptop, where nothing else runs while a network trains)
    torch_threads: int = 0


# psa's recipe (jiwoon-ahn/psa train_cls.py, train_aff.py; docs/fidelity.md).
# psa's PolyOptimizer passes its weight decay 5e-4 as SGD's momentum (psa#28), so psa takes plain
# SGD steps of lr * grad. We use momentum 0.9 and lr / 10, which takes the same effective step
# lr / (1 - momentum) and the same relative weight decay. psa's affinity loss is ours / 4
# (bg/4 + fg/4 + neg/2 vs L_bg + L_fg + 2 L_neg), so AffinityNet also gets lr / 4 and wd x 4:
# 0.0025 / (1 - 0.9) * (4 g + 4 * 5e-4 w) = 0.1 * (g + 5e-4 w), psa's step.
PAPER_TRAIN = {
    "cam": TrainConfig(epochs=15, batch_size=16, lr=0.01),
    "affinity": TrainConfig(epochs=8, batch_size=8, lr=0.0025, weight_decay=2e-3, resize_long=None),
    # DeepLab-CRF-LargeFOV's solver (lr 1e-3, momentum 0.9, wd 5e-4, head 10x), poly schedule
    "deeplab": TrainConfig(epochs=20, lr=0.001, new_layer_lr_mult=10.0, resize_long=(448, 768)),
}


@dataclass(frozen=True)
class PipelineConfig:
    """Ray Data resources of the labeling pipeline; the autoscaler grows worker groups from these.

    With GPUs, network actors (CAM, AffinityNet + random walk; `gpu_actor_*`, `gpu_pool`) feed
    CRF actors (`crf_actor_cpus`, `crf_pool`). Without, one pool of actors runs both stages, one
    per core (`crf_actor_cpus` each, at most `crf_pool[1]`): on a CPU-only cluster both stages
    share the cores anyway, and chained they hand nothing between pools (see bench/pipeline.py).
    Fractional CPU requests keep a 2-core machine from deadlocking (actors, a read task and a
    write task must fit at once).
    """

    batch_size: int = 8
    max_side: int = 2048                  # longer images are labeled shrunk, labels restored to full size
    gpu_actor_gpus: float = 1.0
    gpu_actor_cpus: float = 1.0
    crf_actor_cpus: float = 1.0
    decode_cpus: float = 1.0
    write_cpus: float = 1.0               # a write task; under 1 lets writes overlap busy actors
    shard_rows: int = 2048                # rows committed per shards/ (and index/seeds/) file
    mixed_precision: bool = True          # bf16 network inference where the device has native bf16
    gpu_pool: tuple[int, int] = (1, 8)    # (min, max) actors
    crf_pool: tuple[int, int] = (1, 32)


@dataclass(frozen=True)
class Preset:
    """Everything a labeling run needs, one config per stage."""

    name: str
    cam_train: TrainConfig
    affinity_train: TrainConfig
    deeplab_train: TrainConfig
    cam: CamConfig = field(default_factory=CamConfig)
    walk: WalkConfig = field(default_factory=WalkConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # AffinityNet's backbone whatever --backbone says, trained from scratch; None: the CAM
    # network's backbone, started from the trained CAM network's
    affinity_backbone: str | None = None

    def train_config(self, kind: str) -> TrainConfig:
        """The training config of a network kind (`models.networks.NETWORKS`)."""
        return {"cam": self.cam_train, "affinity": self.affinity_train, "deeplab": self.deeplab_train}[kind]


def _demo_train(**kw: Any) -> TrainConfig:
    # No hue jitter: the synthetic classes differ by head hue (60 degrees apart), which the
    # paper preset's hue jitter of 0.1 (36 degrees) would blur; photos' classes do not hang on hue.
    # From scratch (nothing frozen), ASPP head: the demo's behaviour before psa's recipe came in.
    base: dict[str, Any] = dict(backbone="tiny", crop_size=128, resize_long=(112, 176), batch_size=16,
                color_jitter=(0.3, 0.3, 0.3, 0.0), num_workers=1, mixed_precision=False,
                freeze_pretrained=False, segmentation_head="aspp", channels_last=False)
    base.update(kw)
    return TrainConfig(**base)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        cam_train=PAPER_TRAIN["cam"],
        affinity_train=PAPER_TRAIN["affinity"],
        deeplab_train=PAPER_TRAIN["deeplab"],
    ),
    "demo": Preset(
        name="demo",
        # 15 CAM and 4 AffinityNet epochs over the built-in corpus's 600 images: the steps (and
        # about the time) of 30 and 8 epochs over 300, with twice the images to learn from
        # (bench/README.md, "Seeds of the default run")
        cam_train=_demo_train(epochs=15, lr=0.05),
        affinity_train=_demo_train(epochs=4, lr=0.05),
        deeplab_train=_demo_train(epochs=12, lr=0.02),
        # hard seed maps and bilinear scales: the demo's quality was measured with them; confident
        # foreground at alpha 8 (psa: 4): the tiny CAM network scores a body (its coat shared by
        # two classes) well under the head, so at 4 few body cells were seeded, AffinityNet
        # learned no "same" inside the object and the walk lost the class (five seeds 69.2-88.9
        # final mIoU at 4, 85.2-90.1 at 8; bench/README.md, "Seeds of the default run")
        cam=CamConfig(scales=(0.5, 1.0, 1.5), resample="bilinear", seed_scores=False, alpha_low=8.0),
        # the synthetic images are 96-160 px: walked at >= 320 px, the stride-8 grid has cells
        # small enough to follow object edges (bench/README.md has the measurement)
        # and the final CRF's input keeps an eighth of the CAM's scores: the walk alone leaks a
        # weakly connected class into the background (bench/README.md, "The walk shrinks ...";
        # 0.125 of 0, 0.125, 0.25, 0.5 on five seeds, "Seeds of the default run")
        walk=WalkConfig(min_side=320, cam_weight=0.125),
        pipeline=PipelineConfig(batch_size=16, gpu_actor_cpus=0.5, crf_actor_cpus=0.5,
                                decode_cpus=0.5, write_cpus=0.25, gpu_pool=(1, 2), crf_pool=(1, 2)),
    ),
}


# The demo preset for a backbone that starts from ImageNet weights (`--backbone-weights`; chosen
# by `pretrained_preset`), measured on the hard corpus (bench/README.md, "Pretrained backbones"):
# - the CAM network: psa's frozen BatchNorm and stem, 4 epochs (pretrained features converge
#   fast), crops of 192 of the image enlarged to a long side of 160-240 (at 320-480 the crops cut
#   objects off their tags: held-out mAP 0.88 against 0.91);
# - its CAMs of the image enlarged to a short side of at least 384 (ImageNet's object scale): at
#   the native size of the 96-160 px images they are blobs three times the objects (CAM mIoU 23.0
#   at scales 1-2, 51.0 at min_side 384), whose seeds were 22% right, and AffinityNet learned
#   nothing from them;
# - AffinityNet the tiny network from scratch, as the demo's, 8 epochs: on the same seeds its
#   walk scored 60.7 mIoU (4 epochs; 64.3 at 8) against 57.3 for Lite0's (started from the CAM
#   network, 3 epochs), trained 2.5x and ran 15x faster on two cores (a GPU run takes the paper
#   preset, every network on the backbone).
PRETRAINED_DEMO_TRAIN: dict[str, Any] = dict(crop_size=192, resize_long=(160, 240), freeze_pretrained=True,
                                             channels_last=True, torch_threads=-1)
PRESETS["demo_pretrained"] = replace(
    PRESETS["demo"], name="demo_pretrained",
    cam_train=_demo_train(epochs=4, lr=0.01, **PRETRAINED_DEMO_TRAIN),
    affinity_train=replace(PRESETS["demo"].affinity_train, epochs=8, torch_threads=-1),
    deeplab_train=_demo_train(epochs=8, lr=0.005, **PRETRAINED_DEMO_TRAIN),
    cam=replace(PRESETS["demo"].cam, scales=(1.0,), min_side=384),
    affinity_backbone="tiny",
)


def pretrained_preset(name: str) -> str:
    """The preset a run whose backbone starts from pretrained weights takes for preset `name`:
    "demo_pretrained" for "demo" (the paper preset is psa's recipe for pretrained backbones)."""
    return "demo_pretrained" if name == "demo" else name


def to_dict(obj: Any) -> Any:
    """A config (or nest of them) as JSON-ready dicts, for run.json and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def default_preset(preset: str | None, demo: bool) -> str:
    """The preset a job runs: the one asked for, else "demo" where the run is a demo (the built-in
    corpus, or prediction on a small CPU-only cluster) and "paper" otherwise."""
    return preset or ("demo" if demo else "paper")
