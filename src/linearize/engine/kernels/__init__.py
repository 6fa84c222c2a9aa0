"""linearize's own compiled kernels for the onnx engine: onnxruntime custom ops, built on first use.

One library, domain ``linearize``, three ops (C++, AVX2 + FMA; onnxruntime's C ABI in
``ort_abi.h``, the ops registered by ``register.cc``):

- ``RingAttention`` (``ring_attention.cc``): one token's softmax readout over a layer's ring of
  kept keys and values (float32, or float16 widened as read; ``RingAttentionInt8``: int8
  codes with a scale per 32, llama.cpp's q8_0): each key and value row read once for the
  query heads that share it, the mask, max, exp and sums in the same pass. Its reference: the
  graph's own ops (:func:`linearize.engine.step._softmax_readout`).
- ``MatMul4Bit`` (``matmul_4bit.cc``): a linear with 4-bit codes in groups of 32 and any zero
  points (``q·s + b`` per group, the scales and bases float32 or, on Q4_1's float16 grid,
  float16), the weight in blocks of 8 rows (each group's 8 sums reduced into one vector of
  outputs), int8 or fp32 arithmetic, split over onnxruntime's intra-op threads. Its reference:
  ``MatMulNBits`` plus the offset term (:class:`linearize.models.quantize.QuantizedLinear`'s
  export).
- ``MatMul8Bit`` (``matmul_8bit.cc``): a linear with 8-bit codes on Q8_0's grid (``(q − 128)·s``
  per group of 32: an int4 model's head, an int8 model's every linear), the weight in blocks of
  8 rows so that each group's 8 sums reduce into one vector of outputs; int8 or fp32
  arithmetic. Its reference: ``MatMulNBits`` with 8 bits.

The step graphs (one sequence, the rows') use them; where the library cannot be built (no C++
compiler, a CPU without AVX2 and FMA) the references run, and the tree and chain graphs always
use the references. The library is compiled once per source, compiler and CPU into
``<cache>/kernels/<key>/`` (a whole folder or none, as every cached build); a failed build is
logged and the engine exports its graphs without the kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from linearize.paths import build_once, cache_dir

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = ("ring_attention.cc", "matmul_4bit.cc", "matmul_8bit.cc", "register.cc")
HEADERS = ("ort_abi.h", "simd.h", "matmul.h")
LIBRARY = "linearize_kernels.so"
DOMAIN = "linearize"
# AVX2 + FMA (+ F16C, float16 rings): every x86-64 server CPU since 2013; the kernels' vectors
# are 8 floats wide.
FLAGS = (
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-fno-math-errno",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
)
# Where the CPU has AVX-512 (F, VL, BW), the same 8-float vectors compiled for it: 32 vector
# registers instead of 16, so a value row's whole sums and a key row's per-group sums stay in
# registers (the window kernel at 8k −17 to −20 % on this machine's Zen 4, whose 512-bit
# units run the 256-bit code no faster otherwise).
AVX512 = ("avx512f", "avx512vl", "avx512bw")
COMPILERS = ("c++", "g++", "clang++")


def flags() -> tuple[str, ...]:
    """The compiler flags for this CPU: :data:`FLAGS`, and AVX-512 where it has it (with its
    VNNI: the 4-bit matmul's int8 products and sums in one instruction, ``vpdpbusd``)."""
    cpu = _cpu_flags().split()
    if not all(flag in cpu for flag in AVX512):
        return FLAGS
    extra = (*AVX512, "avx512vnni") if "avx512vnni" in cpu else AVX512
    return (*FLAGS, *(f"-m{flag}" for flag in extra))


def unavailable() -> str | None:
    """Why this machine cannot build the kernels (``None``: it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 (AVX2), not {platform.machine()}"
    flags = _cpu_flags()
    if not flags:
        return "cannot read this CPU's features (/proc/cpuinfo)"
    missing = [flag for flag in ("avx2", "fma", "f16c") if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return f"no C++ compiler found (looked for {', '.join(COMPILERS)})"
    return None


def library(cache: str | os.PathLike | None = None) -> Path | None:
    """The path of the built kernels' library (built now if needed), or ``None`` where
    it cannot be built here (the reason logged once). It belongs to the machine, not to a
    model: it lives in the user cache (:func:`~linearize.paths.cache_dir`, or ``cache``), and
    an engine's own ``cache`` folder holds only its graphs."""
    return _library(str(cache_dir(cache)))


@functools.cache
def _library(root: str) -> Path | None:
    reason = unavailable()
    if reason is not None:
        logger.info("the onnx engine runs without linearize's kernels: %s", reason)
        return None
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    text = b"".join((HERE / name).read_bytes() for name in (*SOURCES, *HEADERS))
    key = hashlib.sha256(
        text + " ".join(flags()).encode() + version.encode() + _cpu_flags().encode()
    ).hexdigest()[:12]
    folder = Path(root) / "kernels" / key
    if not (folder / LIBRARY).is_file():

        def build(tmp: Path) -> None:
            logger.info("compiling linearize's kernels into %s (once per machine)", folder)
            sources = [str(HERE / name) for name in SOURCES]
            command = [compiler, *flags(), *sources, "-o", str(tmp / LIBRARY)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")

        try:
            build_once(folder, build)
        except (RuntimeError, OSError) as error:
            logger.warning("the onnx engine runs without linearize's kernels: %s", error)
            return None
    return folder / LIBRARY


@functools.cache
def _compiler() -> str | None:
    return next((path for name in COMPILERS if (path := shutil.which(name))), None)


@functools.cache
def cpu_flags_line() -> str:
    """This CPU's instruction-set flags as ``/proc/cpuinfo`` lists them (its ``flags`` line, or
    ARM's ``Features``; empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return line.strip()


def _cpu_flags() -> str:
    return " ".join(sorted(set(cpu_flags_line().partition(":")[2].split())))


__all__ = ["DOMAIN", "library", "unavailable"]
