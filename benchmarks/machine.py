"""The machine a benchmark ran on, recorded beside its figures: the CPU's model name and the
flags that decide int8 speed (VNNI, AMX), read from /proc/cpuinfo without importing anything
heavy."""

import os
import platform

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_facts():
    """`{"model_name": ..., <flag>: bool for each of INT8_FLAGS, "logical_cpus": n}`."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model_name": name or platform.processor() or platform.machine(),
            **{flag: flag in flags for flag in INT8_FLAGS}, "logical_cpus": os.cpu_count()}
