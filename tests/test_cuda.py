"""The CUDA + NCCL path: runs where a GPU is visible, skipped elsewhere (CI has none).

Each run is the per-worker entry point (``python -m raytitan.worker``) in a fresh process, one
rank on GPU 0 with an NCCL process group, the debug model, seeded and deterministic. The CPU run
beside it is the reference: the same code on gloo.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from raytitan.components.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BASE = {"training.steps": 6, "training.seq_len": 128, "training.local_batch_size": 4,
        "training.global_batch_size": 4, "training.deterministic": "true", "training.seed": 0,
        "lr_scheduler.warmup_steps": 2, "metrics.log_freq": 1, "metrics.enable_tensorboard": "false",
        "checkpoint.interval": 3}


def train(root: str, name: str, gpu: bool, **overrides) -> list[dict]:
    """Run the worker once; returns every metrics record of run ``name`` so far (all its runs)."""
    args = [sys.executable, "-m", "raytitan.worker", "--job.dump_folder", root, "--ray.name", name,
            "--ray.use_gpu", "true" if gpu else "false"]
    for key, value in {**BASE, **overrides}.items():
        args += [f"--{key}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return read_metrics(os.path.join(root, name))


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss; a later run's record of a step replaces an earlier one's."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_fp32_on_cuda_matches_cpu(tmp_path):
    """fp32 on one GPU (NCCL) follows the CPU (gloo) run step for step, both from one seed
    checkpoint (the CPU's and CUDA's random generators draw different initial weights)."""
    root = str(tmp_path)
    train(root, "seed", gpu=False, **{"checkpoint.create_seed_checkpoint": "true"})
    start = {"training.mixed_precision_param": "float32",
             "checkpoint.initial_load_path": os.path.join(root, "seed", "checkpoint", "step-0")}
    cpu = losses(train(root, "cpu", gpu=False, **start))
    gpu = losses(train(root, "gpu", gpu=True, **start))
    print("fp32 cpu", cpu, "\nfp32 gpu", gpu)
    assert sorted(gpu) == sorted(cpu) == list(range(1, 7))
    for step in cpu:
        assert gpu[step] == pytest.approx(cpu[step], rel=5e-4), step
    assert gpu[6] < gpu[1]


def test_bf16_resume_on_cuda_is_exact_and_the_checkpoint_loads_on_cpu(tmp_path):
    """bf16 (the CUDA default) resumed from its step-3 checkpoint repeats the uninterrupted run's
    steps 4-6 exactly, and the step-6 checkpoint written from GPU memory resumes on the CPU."""
    root = str(tmp_path)
    whole = losses(train(root, "whole", gpu=True))
    train(root, "resumed", gpu=True, **{"training.steps": 3})
    resumed = losses(train(root, "resumed", gpu=True))
    print("bf16 whole", whole, "\nbf16 resumed", resumed)
    assert all(math.isfinite(v) for v in whole.values())
    assert [resumed[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]
    on_cpu = losses(train(root, "resumed", gpu=False, **{"training.steps": 7}))
    assert 7 in on_cpu and math.isfinite(on_cpu[7])
    assert on_cpu[7] == pytest.approx(whole[6], rel=0.1)  # the trained weights, not a fresh model


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="Float8 matmuls need compute capability 8.9 or higher")
def test_float8_and_compile_track_bf16(tmp_path):
    """Float8 linears (real float8 kernels, not emulated) under torch.compile train the debug
    model as bf16 eager does: every step's loss within 5%."""
    root = str(tmp_path)
    steps = {"training.steps": 8, "training.deterministic": "false"}
    bf16 = losses(train(root, "bf16", gpu=True, **steps))
    fp8 = losses(train(root, "fp8", gpu=True, **steps, **{"model.converters": "float8", "compile.enable": "true"}))
    print("bf16", bf16, "\nfloat8+compile", fp8)
    for step in bf16:
        assert fp8[step] == pytest.approx(bf16[step], rel=0.05), step
    assert fp8[8] < fp8[1]
