"""Re-run every notebook under other CPU code paths and compare with the stored outputs.

``make test-portable`` runs this. A reader's machine computes with other kernels than
the one that stored the outputs: PyTorch picks its vectorised CPU kernels by the
processor's instruction set (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``, ``avx512``
on x86-64), and MKL and oneDNN pick theirs too (``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``).
Forcing each of them here shows, on one machine, what readers' machines will see: every
notebook must pass nbval (with the tolerant comparison of ``nbval_tolerant.py``) under
every variant.

Usage: ``python tools/portability.py [--variant NAME]... [--jobs N] [--report DIR]
[NOTEBOOK ...]``; ``--print-env NAME`` prints a variant's environment (``KEY=VALUE``
lines, for ``env``) and ``--ci`` the two variants CI runs (see :func:`ci_variants`).
Prints, per variant, the pytest summary, and at the end the cells that deviated
from their stored outputs with the largest deviation seen and the tolerance the cell
declares: the measured spreads behind the tolerances.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name -> environment. Each variant simulates a CPU that exists: PyTorch's own kernels
#: (``ATEN_CPU_CAPABILITY``) and oneDNN's (``ONEDNN_MAX_CPU_ISA``, which runs the float32
#: and bfloat16 matmuls and convolutions) are limited together. Limiting ATen alone gives
#: a CPU that no one has, and on a CPU with AMX oneDNN's native bfloat16 kernels then
#: meet ATen code that refuses them ("pack_vnni2 is only supported when avx512 is").
#:
#: * ``default``: the oldest x86-64 path (SSE4.1, no AVX), as on very old or emulated CPUs.
#: * ``avx2-mkl``: a laptop or desktop without AVX-512, with MKL in its reproducible mode
#:   (``MKL_CBWR=COMPATIBLE``): one run for two variations, to keep CI within budget.
#: * ``avx512-core``: AVX-512 without its bfloat16/fp16/AMX extensions, like most AVX-512
#:   cloud servers; bfloat16 arithmetic is then emulated.
#: * ``avx512``: AVX-512 with whatever extensions this CPU has.
#: ``native`` is what ``make test`` already runs; ``avx2`` and ``mkl-compatible`` alone
#: are there to tell the two parts of ``avx2-mkl`` apart.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2-mkl": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "MKL_CBWR": "COMPATIBLE"},
    "avx512-core": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
}

_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
_BF16_HARDWARE = {"avx512_bf16", "amx_bf16"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def available_variants() -> list[str]:
    """The variants this machine can run: x86-64 kernels only on x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]  # Arm: PyTorch has the default and its own SVE/NEON paths
    flags = _cpu_flags()
    names = ["default"]
    names.append("avx2-mkl" if "avx2" in flags else "mkl-compatible")
    if _AVX512 <= flags:
        # On a CPU with bfloat16 hardware, the AVX-512 machines without it are the ones
        # whose arithmetic differs; on one without, plain AVX-512 is that machine.
        names.append("avx512-core" if flags & _BF16_HARDWARE else "avx512")
    return names


def ci_variants() -> tuple[str, str]:
    """The two variants CI runs: ``(one for make test, one for make test-portable)``.

    The guarantee is that every notebook passes under the oldest x86-64 kernels and under
    a common laptop's (AVX2, MKL in its reproducible mode). CI runs ``make test`` -- unit
    tests and notebooks -- under the second, and the notebooks once more under the first,
    so that each notebook runs twice, not three times. The AVX-512 variants run in a full
    ``make test-portable``.
    """
    names = available_variants()
    return names[1] if len(names) > 1 else names[0], names[0]


def _native_is_avx512() -> bool:
    import torch

    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def run_variant(name: str, notebooks: list[str], jobs: int, report: Path) -> tuple[int, float]:
    env = {**os.environ, **VARIANTS[name], "NBVAL_TOLERANT_REPORT": str(report),
           "COMPANION_DEVICE": "cpu", "PYTHONHASHSEED": "0",
           "NOTEBOOK_TIMINGS": str(report.parent.parent / "timings" / f"portable-{name}.json")}
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--no-header", "-rf", "-o", "testpaths=book", *notebooks]
    if jobs > 1:
        command += ["-n", str(jobs), "--dist", "loadscope"]
    start = time.perf_counter()
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in VARIANTS[name].items())}", flush=True)
    code = subprocess.call(command, cwd=ROOT, env=env)
    return code, time.perf_counter() - start


def summarise(reports: dict[str, Path]) -> list[str]:
    """One line per cell that deviated in some variant: largest deviations and tolerance."""
    cells: dict[str, dict] = {}
    for name, path in reports.items():
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["max_rel"] == 0 and r["image_rms"] == 0 and r["ok"]:
                continue
            c = cells.setdefault(r["cell"], {"rel": 0.0, "abs": 0.0, "rms": 0.0, "variants": [],
                                             "rtol": r["rtol"], "atol": r["atol"],
                                             "image": r["image"], "failed": []})
            c["rel"] = max(c["rel"], r["max_rel"])
            c["abs"] = max(c["abs"], r["max_abs"])
            c["rms"] = max(c["rms"], r["image_rms"])
            c["variants"].append(name)
            if not r["ok"]:
                c["failed"].append(name)
    lines = []
    for cell, c in sorted(cells.items()):
        lines.append(f"{cell}: max rel {c['rel']:.2g}, max abs {c['abs']:.2g}, image RMS "
                     f"{c['rms']:.2f} (declared rtol={c['rtol']:g} atol={c['atol']:g} "
                     f"image={c['image']:g}) in {','.join(c['variants'])}"
                     + (f"; FAILED in {','.join(c['failed'])}" if c["failed"] else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=["book"])
    parser.add_argument("--variant", action="append", dest="variants", default=None,
                        help=f"one of {list(VARIANTS)}, repeatable (default: all this CPU can run)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", type=Path, default=ROOT / "_build" / "portability")
    parser.add_argument("--print-env", metavar="NAME", choices=list(VARIANTS),
                        help="print the variant's environment as KEY=VALUE lines and exit")
    parser.add_argument("--ci", action="store_true",
                        help="print the variants CI uses for make test and make test-portable")
    args = parser.parse_args(argv)
    if args.print_env:
        print("\n".join(f"{k}={v}" for k, v in VARIANTS[args.print_env].items()))
        return 0
    if args.ci:
        print(*ci_variants())
        return 0
    names = args.variants or available_variants()
    if args.variants is None and "avx512" in names and _native_is_avx512():
        names.remove("avx512")  # `make test` has just run the AVX-512 kernels
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    args.report.mkdir(parents=True, exist_ok=True)
    failed, reports, total = [], {}, 0.0
    for name in names:
        reports[name] = args.report / f"{name}.jsonl"
        code, seconds = run_variant(name, args.notebooks, args.jobs, reports[name])
        total += seconds
        print(f"== {name}: {'passed' if code == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    print("\n== cells that deviated from their stored outputs (largest over the variants)")
    for line in summarise(reports) or ["none"]:
        print(line)
    print(f"\n== portability: {len(names) - len(failed)} of {len(names)} variants passed "
          f"({', '.join(names)}) in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
