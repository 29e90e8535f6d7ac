"""Throughput, MFU, memory and a one-line progress log; TensorBoard on rank 0."""

from __future__ import annotations

import json
import logging
import resource
import time

import torch

from raytitan.components import storage
logger = logging.getLogger("raytitan")

PROGRESS_BAR_MODES = ("auto", "on", "off")  # metrics.progress_bar: see raytitan.ray.progress
METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak TFLOP/s per device, from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "B200": 2250.0,
}


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak TFLOP/s of ``device``: the override, the table, or None (no honest number known)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu_percent(flops_per_token: float, tokens_per_s_per_device: float, peak: float) -> float:
    """Model FLOPs utilization: the model's training FLOPs per second per device over the peak."""
    return 100 * flops_per_token * tokens_per_s_per_device / (peak * 1e12)


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory: on CUDA since the last report (the peaks are reset after each), on CPU the
    process's peak RSS so far (the kernel keeps no resettable window)."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {
            "memory/max_active_gib": stats.get("active_bytes.all.peak", 0) / 2**30,
            "memory/max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
            "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
        }
    # ru_maxrss is in KiB on Linux.
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def data_summary(metrics: dict[str, float]) -> str:
    """The training data's line: tokens/s its pipeline produced, batches buffered ahead, packing
    actors, and this rank's request latency, for the keys the loader reported (``data/...``)."""
    parts = []
    if "data/tokens_per_s" in metrics:
        parts.append(f"{metrics['data/tokens_per_s']:,.0f} tok/s produced")
    if "data/buffered_batches" in metrics:
        parts.append(f"{metrics['data/buffered_batches']:.0f} batches ahead")
    if "data/packers" in metrics:
        parts.append(f"{metrics['data/packers']:.0f} packers")
    if "data/request_latency_mean_s" in metrics:
        parts.append(f"request {1e3 * metrics['data/request_latency_mean_s']:.1f} ms mean, "
                     f"{1e3 * metrics['data/request_latency_max_s']:.1f} ms max")
    return ", ".join(parts)


def moe_summary(metrics: dict[str, float]) -> str:
    """The MoE layers' part of the log line: the worst layer's max/mean tokens per expert and the
    highest busiest-expert share (``moe/...``; every layer's keys go to metrics.jsonl and TensorBoard)."""
    if "moe/max_over_mean" not in metrics:
        return ""
    return (f"  moe max/mean {metrics['moe/max_over_mean']:.2f} (layer {metrics['moe/worst_layer']:.0f}) "
            f"busiest {100 * metrics['moe/busiest_share']:.0f}%")


class MetricsLogger:
    """Accumulates timing between log steps and turns it into per-device rates."""

    def __init__(self, device: torch.device, flops_per_token: int, world_size: int, peak_override: float,
                 tb_folder: str | None, rank: int, jsonl_path: str | None = None):
        self.device, self.flops_per_token, self.world_size = device, flops_per_token, world_size
        self.peak = peak_tflops(device, peak_override)
        self.rank = rank
        self.jsonl_path = jsonl_path if rank == 0 else None
        self._lines: list[str] = []
        self.writer = None
        if tb_folder and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_folder)
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._data_wait = 0.0

    def record_step(self, tokens: int, data_wait_s: float) -> None:
        self._tokens += tokens
        self._data_wait += data_wait_s

    def summarize(self, step: int, loss: float, grad_norm: float, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / elapsed / self.world_size
        tflops = self.flops_per_token * tps / 1e12
        metrics = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_sec_per_device": tps,
            "tflops_per_device": tflops,
            "data_wait_share": self._data_wait / elapsed,
            "data_wait_s": self._data_wait,
            "window_s": elapsed,
            **memory_gib(self.device),
        }
        if self.peak:
            metrics["mfu_pct"] = mfu_percent(self.flops_per_token, tps, self.peak)
        self._reset()
        return metrics

    def log(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        mem = metrics.get("memory/max_active_gib", metrics.get("memory/max_rss_gib", 0.0))
        mfu = f"{metrics['mfu_pct']:.1f}%" if "mfu_pct" in metrics else "n/a"
        logger.info(
            "step %5d  loss %7.4f  grad_norm %6.3f  lr %.2e  tok/s/dev %8.0f  tflops %6.2f  mfu %s  "
            "mem %.2fGiB  data_wait %4.1f%%%s%s",
            metrics["step"], metrics["loss"], metrics["grad_norm"], metrics["lr"],
            metrics["tokens_per_sec_per_device"], metrics["tflops_per_device"], mfu, mem,
            100 * metrics["data_wait_share"], f" ({data})" if (data := data_summary(metrics)) else "",
            moe_summary(metrics),
        )
        self._write(int(metrics["step"]), metrics)

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        logger.info("validation at step %d: loss %.4f", step, metrics["validation/loss"])
        self._write(step, metrics)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        """TensorBoard scalars and one line of ``metrics.jsonl`` (what notebooks and summaries read)."""
        if self.writer:
            for k, v in metrics.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.jsonl_path:
            self._lines.append(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            if not storage.is_remote(self.jsonl_path):
                self.flush()

    def flush(self) -> None:
        """Append the buffered lines; an object store gets them in batches (each append rewrites
        the object), at every report and at the end."""
        if self._lines:
            storage.append_text(self.jsonl_path, "".join(self._lines))
            self._lines.clear()

    def close(self) -> None:
        self.flush()
        if self.writer:
            self.writer.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, oldest first (empty if it does not exist yet)."""
    if not storage.isfile(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def read_metrics(run_dir: str) -> list[dict]:
    """Every metrics line rank 0 logged for a run, oldest first."""
    return read_jsonl(storage.join(run_dir, METRICS_FILE))

