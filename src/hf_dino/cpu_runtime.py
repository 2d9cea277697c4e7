"""Process settings of a training run on a CPU: torch threads, glibc malloc and bf16 hardware."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step frees and re-allocates the same large tensors every step (activations; at
    K = 65,536 the head's K x 256 weight, its bf16 copy and its gradient, 16-64 MB each). glibc
    serves blocks above its mmap threshold (32 MB at most) with fresh mappings and trims the free
    top of its heap, so the next step page-faults all of them in again: ~150,000 page faults and
    0.2-1 s of kernel time per ViT-S/16 step on a 2-core CPU (docs/BENCHMARKS.md). With mmap and
    trimming off (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, INT_MAX)`) the memory one
    step frees serves the next; the process's footprint stays at its peak. Affects the whole
    process from now on. Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def cpu_has_bf16_matmuls() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without either, oneDNN
    emulates bf16: on an AVX2-only AMD EPYC a bf16 matmul ran ~500x slower than fp32
    (docs/BENCHMARKS.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def configure_cpu_training(num_threads: int | None, local_processes: int, mixed_precision: str,
                           keep_freed_memory: bool) -> None:
    """Settings of a CPU training process: `num_threads` torch threads (None: the cores available
    divided among the `local_processes` of this machine; `accelerate launch` exports
    OMP_NUM_THREADS=1, which would halve a 2-core demo's speed), a warning when bf16 would be
    emulated, and `keep_freed_cpu_memory` when `keep_freed_memory`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(num_threads or max(1, cores // max(1, local_processes)))
    if mixed_precision == "bf16" and not cpu_has_bf16_matmuls():
        logger.warning("mixed_precision bf16 on a CPU without bf16 matmul hardware (AVX512-BF16 or AMX): "
                       "bf16 is emulated here and can be far slower than fp32; use --mixed_precision no")
    if keep_freed_memory and keep_freed_cpu_memory():
        logger.info("glibc malloc keeps freed memory for reuse (keep_freed_cpu_memory)")
