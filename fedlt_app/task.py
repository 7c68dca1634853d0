"""What the client and the server build the same way: data, model, device, seeds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlt_app.checkpoint import load_final_model
from fedlt_app.config import RunConfig, resolve_recorded
from fedlt_app.configured_data import federated_data
from fedlt_app.data import FederatedData
from fedlt_app.methods import get_method
from fedlt_app.models import EncoderClassifier, build_model


def resolve_device(name: str) -> torch.device:
    """The device of the run config's ``device``; on a GPU, CUDA is first made deterministic."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is visible (use device='auto' or 'cpu')")
    if name == "cuda":
        make_cuda_deterministic()
    return torch.device(name)


def make_cuda_deterministic() -> None:
    """Ask CUDA for repeatable kernels, so that a seed repeats to the digit on a GPU as it does on CPUs.

    Left to itself, cuDNN chooses convolution algorithms by timing them and some accumulate with atomics:
    two GPU runs of one seed then part in the last digits within a few rounds (seen on an H200: FedAvg's
    round-3 accuracy 0.3442 against 0.3444; an active-learning resume no longer ends where the uninterrupted
    run did). cuBLAS needs its workspace fixed before its first handle is made, hence the environment
    variable (an existing setting is kept); attention runs its plain kernel, as the fused ones ignore the
    flag. Ops with no deterministic CUDA kernel warn instead of stopping the run (none that fedlt's tests
    reach did: results/gpu-check). Process-wide, like the RNG seeds; on CPUs nothing changes, as fedlt's CPU
    kernels repeat already.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    # The fused attention kernels (cuDNN, flash, memory-efficient) keep a non-deterministic backward under
    # warn_only (seen on an H200: PromptFL and CAPT, through CLIP's transformer, warned for each in turn);
    # the plain matmul-and-softmax kernel is deterministic.
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition-id, num-partitions) of this node, from its node config."""
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config: {missing} is missing; start SuperNodes with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def client_dataset(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[FederatedData, Tensor, Tensor]:
    """The run's data and this node's own (uint8 images, labels).

    A node whose config names ``local-data`` trains on its own files (see
    :mod:`fedlt_app.data.local`) instead of partition ``partition-id``.
    """
    from fedlt_app.data.local import LOCAL_DATA_KEY, local_client_dataset

    partition_id, num_partitions = node_partition(node_config)
    if LOCAL_DATA_KEY in node_config:
        return local_client_dataset(cfg.dataset, str(node_config[LOCAL_DATA_KEY]))
    data = federated_data(cfg, num_partitions)
    images, labels = data.client_data(partition_id)
    return data, images, labels


def method_model(cfg: RunConfig, data: FederatedData) -> EncoderClassifier:
    """The network the method trains (RedGrape's carries Ŵ as well; CLIP methods build their own)."""
    method = get_method(cfg.method)
    if method.build is not None:
        return method.build(cfg, data, resolve_device(cfg.device))
    _, channels, height, _ = data.dataset.train_images.shape
    model = build_model(cfg.model, data.num_classes, channels, height)
    return method.extend_model(model)


def trained_model(run_dir: Path) -> tuple[EncoderClassifier, RunConfig]:
    """The network a finished run measured its last accuracy on (``final_model.pt``), in eval mode, with the
    run's config: e.g. ``model(to_float(images, cfg.dataset))`` classifies as the run's last round did."""
    saved = load_final_model(run_dir)
    cfg = resolve_recorded(saved["run_config"])
    model = method_model(cfg, federated_data(cfg, saved["num_clients"]))
    model.load_travelling_state(saved["state"])
    return model.eval(), cfg


def initial_model(cfg: RunConfig, data: FederatedData) -> EncoderClassifier:
    """The global model of round 0, a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return method_model(cfg, data)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Independent, reproducible stream per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


STATISTICS_STREAM = 0x73746174  # "stat": tags the statistics query's seed sequence


def statistics_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The statistics query's own stream per (run seed, round, client), apart from that round's training."""
    return int(np.random.SeedSequence([seed, server_round, partition_id, STATISTICS_STREAM]).generate_state(1)[0])
