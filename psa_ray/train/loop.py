"""One Ray Train loop for the three networks (CAM net, AffinityNet, DeepLab).

`fit` is the driver side (TorchTrainer, scaling, storage, failure handling); `train_loop_per_worker`
runs on each worker: the torchvision-references style loop of SGD with a poly schedule, 10x rate
on new layers, mixed precision per device (`train_precision`), and a checkpoint every epoch that a
restarted run resumes from (`restore_checkpoint`)."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig)
from ray.train.torch import TorchTrainer, get_device, prepare_model

from psa_ray.config import TrainConfig
from psa_ray.io.storage import join
from psa_ray.models.inference import (
    MODEL_FILE, check_cuda, export_network, inference_device, meta_normalization, native_bf16, network_meta,
    read_meta)
from psa_ray.models.networks import Network, build_network
from psa_ray.models.weights import load_weights
from psa_ray.train.tasks import Init, freezes_pretrained, get_task

STATE_FILE = "train_state.pt"
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def granted_gpus() -> list[Any]:
    """The GPUs Ray gave the calling process (none outside Ray)."""
    return ray.get_gpu_ids() if ray.is_initialized() else []


def ray_device() -> torch.device:
    """`inference_device` of the calling Ray worker or actor: a GPU Ray gave it that CUDA cannot
    use is an error, not a fall back to the CPU."""
    return inference_device(granted_gpus())


def poly_lr(base_lr: float, step: int, max_steps: int, power: float) -> float:
    """The poly schedule: base_lr * (1 - step / max_steps) ** power."""
    factor: float = (1.0 - min(step, max_steps) / max_steps) ** power
    return base_lr * factor


def make_optimizer(model: Network, config: TrainConfig) -> torch.optim.SGD:
    """SGD over (backbone, new layers) with the new layers at `new_layer_lr_mult` x the rate."""
    backbone_params, new_params = model.param_groups()
    return torch.optim.SGD(
        [{"params": backbone_params, "lr_mult": 1.0},
         {"params": new_params, "lr_mult": config.new_layer_lr_mult}],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _init_weights(model: Network, config: TrainConfig, init: Init | None) -> None:
    """Initial weights: pretrained backbone weights, then `init`."""
    if config.backbone_weights:
        load_weights(model.backbone, config.backbone_weights, strict=False)
    if init:
        load_weights(model.backbone if init.backbone_only else model, init.uri, strict=not init.backbone_only)


def restore_checkpoint(model: Network, folder: str, device: torch.device,
                       config: TrainConfig) -> tuple[torch.optim.SGD, dict[str, Any]]:
    """Resume from a checkpoint `folder`: its weights loaded into `model`, the model moved to
    `device`, and only then the optimizer built and its saved state loaded, so that its momentum
    buffers follow the parameters onto `device` (built before the move, they would stay on the
    CPU). Returns (optimizer, the saved training state)."""
    model.load_state_dict(torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True))
    state: dict[str, Any] = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer = make_optimizer(model.to(device), config)
    optimizer.load_state_dict(state["optimizer"])
    return optimizer, state


def train_precision(device: torch.device, mixed_precision: bool) -> str:
    """The training precision on `device`: "bf16" where it computes bf16 natively (CUDA compute
    capability 8.0+), "fp16" with a gradient scaler on other CUDA GPUs, else "fp32" (the CPU, or
    mixed precision off)."""
    if not mixed_precision or device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def epoch_shuffle(config: TrainConfig, epoch: int, rank: int) -> dict[str, Any]:
    """`iter_batches` arguments of an epoch's local shuffle: a new order each epoch, the same
    order for the same (seed, epoch, rank)."""
    if config.shuffle_rows <= 0:
        return {}
    seed = int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])
    return {"local_shuffle_buffer_size": config.shuffle_rows, "local_shuffle_seed": seed}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; `loop_config` is built by `fit`."""
    config: TrainConfig = loop_config["train"]
    quiet_worker_console(loop_config.get("console_level", "INFO"))
    task = get_task(loop_config["kind"], loop_config.get("radius", 5))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    if config.torch_threads:  # else Ray's: one per CPU the worker asked for
        torch.set_num_threads((os.cpu_count() or 1) if config.torch_threads < 0 else config.torch_threads)
    device = get_device()
    if granted_gpus():
        check_cuda(granted_gpus())  # get_device() would fall back to the CPU without a word

    network = build_network(task.kind, config.backbone, loop_config["num_classes"], config.segmentation_head)
    if freezes_pretrained(config, loop_config.get("init")):
        network.freeze_pretrained()  # BN in eval, gamma/beta and the stem frozen, as psa
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    precision = train_precision(device, config.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_epoch, step, first_loss = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            optimizer, state = restore_checkpoint(network, folder, device, config)
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, first_loss = int(state["epoch"]), int(state["step"]), state["first_loss"]
    else:
        _init_weights(network, config, loop_config.get("init"))
        optimizer = make_optimizer(network.to(device), config)
    model = prepare_model(network)
    core: torch.nn.Module = getattr(model, "module", model)  # the network, out of DistributedDataParallel

    # here, in the worker: the driver (which only plans Ray Train) never loads torchvision (~165 MB)
    from psa_ray.train.augment import TrainAugment
    augment = TrainAugment(config, meta_normalization(loop_config["meta"]))
    per_worker_batch = max(1, config.batch_size // world)
    max_steps = max(1, loop_config["steps_per_epoch"] * config.epochs)
    autocast = PRECISION_DTYPES[precision]
    shard = ray.train.get_dataset_shard("train")

    for epoch in range(start_epoch, config.epochs):
        model.train()
        started, batches = time.perf_counter(), 0
        sums: dict[str, float] = {}
        for batch in shard.iter_batches(batch_size=per_worker_batch, batch_format="numpy", drop_last=False,
                                        **epoch_shuffle(config, epoch, rank)):
            images, masks = augment.batch(batch["rgb"], batch["mask"] if task.uses_mask else None)
            tensors = {"tags": torch.as_tensor(np.stack(batch["tags"]), dtype=torch.float32)}
            if masks is not None:
                tensors["mask"] = masks
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            lr = poly_lr(config.lr, step, max_steps, config.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss, parts = task.loss(model, images, tensors)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batches += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)

        metrics: dict[str, Any] = {k: v / max(batches, 1) for k, v in sums.items()}
        first_loss = metrics.get("loss") if first_loss is None else first_loss
        metrics.update(epoch=epoch + 1, step=step, first_loss=first_loss, resumed_from_epoch=start_epoch,
                       epoch_seconds=time.perf_counter() - started, precision=precision)
        last = epoch + 1 == config.epochs
        if rank == 0:  # the job's progress line for this stage (the worker's stdout reaches the driver)
            print(f"[{task.kind}] epoch {epoch + 1}/{config.epochs}: loss {metrics.get('loss', float('nan')):.4f}, "
                  f"{metrics['epoch_seconds']:.0f} s", flush=True)
        if rank == 0 and (last or (epoch + 1) % config.checkpoint_every_epochs == 0):
            with tempfile.TemporaryDirectory() as folder:
                export_network(core.state_dict(), loop_config["meta"], folder)
                torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                            "step": step, "first_loss": first_loss}, os.path.join(folder, STATE_FILE))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def fit(kind: str, dataset: ray.data.Dataset, config: TrainConfig, *, num_rows: int,
        class_names: list[str], checkpoints: str, init: Init | None = None,
        radius: int = 5, cpus_per_worker: float = 1.0, max_failures: int = 2) -> tuple[str, dict[str, Any]]:
    """Train one network with Ray Train; returns (URI of the exported weights, last metrics).

    `dataset` rows carry `rgb` (uint8 HxWx3), `tags` (multi-hot float32) and, for AffinityNet and
    DeepLab, `mask` (seeds or pseudo labels). Checkpoints go to `<checkpoints>/<kind>/` (an
    output's `layout.OutputLayout.checkpoints`); rerunning with the same folder resumes from the
    latest one. The final weights are exported to `<checkpoints>/<kind>/model.pt` with
    `meta.json` beside them.
    """
    # a network started from another's backbone (AffinityNet, DeepLab) takes its input normalisation
    meta = network_meta(kind, config, class_names, radius,
                        meta_normalization(read_meta(init.uri)) if init else None)
    per_step = max(1, config.batch_size // max(1, config.num_workers)) * max(1, config.num_workers)
    loop_config = {"kind": kind, "train": config, "num_classes": len(class_names), "init": init,
                   "console_level": _console_level(),
                   "radius": radius, "meta": meta, "steps_per_epoch": math.ceil(num_rows / per_step)}
    worker_resources = {"CPU": cpus_per_worker}
    if config.use_gpu:
        worker_resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=RunConfig(name=kind, storage_path=_ray_storage_path(checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **_train_logging()),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=_in_order()),
    )
    result = trainer.fit()
    if result.checkpoint is None:  # rank 0 reports one at the last epoch
        raise RuntimeError(f"Ray Train's {kind} run ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    return export_network(state, meta, join(checkpoints, kind)), dict(result.metrics or {})


def _console_level() -> str:
    """The driver's Ray log level (`progress.ray_logging`: INFO with --verbose, else WARNING)."""
    return logging.getLevelName(logging.getLogger("ray").getEffectiveLevel())


def _train_logging() -> dict[str, Any]:
    """RunConfig's logging: Ray Train's console at the driver's Ray level. A keyword mypy cannot
    check: Ray 2.60 runs Train V2, whose RunConfig takes it, while its stubs name V1's."""
    return {"logging_config": LoggingConfig(_console_level())}


def quiet_worker_console(level: str) -> None:
    """In a training worker: console records below `level` dropped. Ray Train 2.60 logs every
    report at INFO under a logger named by its file path, which its own level setting misses."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(level)


def _in_order() -> ray.data.ExecutionOptions:
    """Ray Train's ingest options with the rows in the dataset's order: with the workers seeded,
    the same run on one worker trains the same network (several workers share the rows in the
    order they ask for them, which varies)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _ray_storage_path(uri: str) -> str:
    """Ray Train takes `s3://...` directly (endpoint from AWS_ENDPOINT_URL) and absolute local paths."""
    return uri if "://" in uri else os.path.abspath(uri)
