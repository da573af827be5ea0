"""Compile every kernel variant ahead of time for an NVIDIA architecture, no GPU needed.

Catches what the interpreter cannot: layout or lowering errors that only the GPU compiler
sees. Prints one line per variant (PTX size, shared memory, ); with --asm-dir writes
the PTX, TTGIR and cubin of each. The variants and their launch configurations come from
``flatlora_kernels.triton_ops.aot`` (every entry of the matmul configuration table). Must run
without TRITON_INTERPRET.

    python scripts/compile_for_gpu.py --arch 90
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_for_gpu.py compiles real kernels: unset TRITON_INTERPRET")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatlora_kernels.triton_ops.aot import compile_variant, variants  # noqa: E402


def file_stem(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 90 for H100/H200")
    parser.add_argument("--asm-dir", type=Path, help="write PTX, TTGIR and cubin of each variant here")
    args = parser.parse_args()
    failures = 0
    for variant in variants():
        try:
            compiled = compile_variant(variant, args.arch)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {variant.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        ptx = compiled.asm["ptx"]
        print(f"ok   {variant.name}: ptx {len(ptx) // 1024} KiB, shared {compiled.metadata.shared} B")
        if args.asm_dir:
            args.asm_dir.mkdir(parents=True, exist_ok=True)
            stem = file_stem(variant.name)
            (args.asm_dir / f"{stem}.ptx").write_text(ptx)
            (args.asm_dir / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
            (args.asm_dir / f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
    print(f"{failures} failed" if failures else f"all variants compile for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
