"""Benchmark harnesses: scripts that print numbers and ratios against a reference measured in the
same run. Not part of the installed library (`hf_dino`); run from a checkout."""


def machine_description() -> str:
    """'CPU model (AMX / AVX-512 / neither), N torch threads, torch X': what a benchmark's numbers
    were measured on (the build machines differ in exactly these)."""
    import platform
    from pathlib import Path

    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if cpu and flags:
                break
    units = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "no AVX-512/AMX"
    return f"{cpu} ({units}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"
