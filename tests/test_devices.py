"""The precision `--precision auto` picks: from what the CPU offers, measured only where that is unknown."""

from __future__ import annotations

import pytest

from difflab.devices import cpu_flags, cpu_model_name, cpu_precision
from difflab.training.accelerator import mixed_precision

EPYC = {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}  # AMD EPYC (Zen 4): AVX-512 BF16, no AMX
SAPPHIRE_RAPIDS = {"fpu", "sse2", "avx512f", "amx_tile", "amx_bf16"}
OLDER_X86 = {"fpu", "sse2", "avx2", "avx512f"}


def never_measured() -> float:
    raise AssertionError("the CPU's flags decide; nothing should be measured")


@pytest.mark.parametrize("flags,expected", [(EPYC, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (OLDER_X86, "no")])
def test_x86_flags_decide_without_measuring(flags, expected):
    assert cpu_precision(flags, never_measured) == expected


@pytest.mark.parametrize("flags", [None, {"fp", "asimd", "bf16"}])  # unreadable, or not x86's flags
def test_where_the_flags_cannot_tell_a_measurement_does(flags):
    assert cpu_precision(flags, lambda: 2.0) == "bf16"
    assert cpu_precision(flags, lambda: 1.1) == "no"  # emulated bf16 is no faster


def test_cpuinfo_is_read_for_flags_and_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
                       "flags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx512_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512_bf16"}
    assert cpu_model_name(cpuinfo) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_flags(tmp_path / "missing") is None and cpu_model_name(tmp_path / "missing") is None


def test_a_precision_given_is_kept():
    assert [mixed_precision(choice, "cpu") for choice in ("no", "fp16", "bf16")] == ["no", "fp16", "bf16"]
