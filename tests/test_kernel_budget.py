"""benchmarks/kernel_budget.py: its SASS reading on a hand-written listing whose counts are known,
and the report on the real kernels (where Triton's NVIDIA backend can compile them)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton build has no NVIDIA backend")
def test_kernel_budget_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "budget.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_budget.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["schema"] == "flatlora-bench/1" and record["benchmark"] == "kernel_budget"
    assert record["config"]["source"].startswith("SASS")
    matmuls = [e for e in record["results"] if e["role"] in ("forward", "dX")]
    roles = {(e["role"], e["kernel"].split()[2]) for e in matmuls}
    assert roles == {(r, d) for r in ("forward", "dX") for d in ("float32", "bfloat16", "float16")}
    for entry in matmuls:
        assert entry["loop_found"], entry["kernel"]
        assert entry["classes"]["mma"] > 0, f"{entry['kernel']}: no tensor-core MMA in the K-loop"
        assert entry["noise_elements_per_thread"] > 0 and entry["tokens_per_noise_tile"] > 0
        assert 0 < entry["alu_per_noise_element"] < 1000
        assert entry["predicted_alu_to_mma_time"] > 0 and entry["predicted_iteration_over_mma_time"] >= 1
        assert entry["registers"] > 0
    assert {e["role"] for e in matmuls if "4-bit" in e["kernel"]} == {"forward", "dX"}
    for entry in matmuls:
        if "float32" not in entry["kernel"]:  # the 16-bit loops: hardware SFU noise, no spills
            # (except over a 4-bit W whose blocks straddle rows, no real model's shape: every code is
            # addressed on its own there; benchmarks/NOTES.md 1.7)
            if "straddling" not in entry["kernel"]:
                assert entry["classes"]["local"] == 0, f"{entry['kernel']}: LDL/STL in the K-loop"
            assert {"MUFU.LG2", "MUFU.SIN", "MUFU.COS"} <= set(entry["mufu"]), entry["mufu"]
    for entry in record["results"]:
        assert entry["loop_instructions"] > 0


# A K-loop as nvdisasm prints it: a wgmma, three instructions issued before its wait, a predicated
# forward branch over an inner loop (a cold path), two FMAs, a uniform add and the back edge.
LISTING = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0020*/                   IMAD R2, R3, R4, R5 ;
        /*0030*/                   IMAD.MOV.U32 R6, RZ, RZ, R5 ;
        /*0040*/                   MUFU.SIN R7, R8 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
.L_x_1:
        /*0070*/                   MUFU.LG2 R9, R10 ;
        /*0080*/               @P2 BRA `(.L_x_1) ;
.L_x_2:
        /*0090*/                   FFMA R11, R12, R13, R11 ;
        /*00a0*/                   FFMA R14, R12, R13, R14 ;
        /*00b0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00c0*/               @P0 BRA `(.L_x_0) ;
        /*00d0*/                   EXIT ;
""".splitlines()


@pytest.fixture
def kernel_budget(monkeypatch):
    """benchmarks/kernel_budget.py as a module (it refuses to load under the interpreter, which only
    matters for compiling; this test reads a listing)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("kernel_budget_under_test", ROOT / "benchmarks" / "kernel_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loop_body_counts_of_a_hand_written_listing(kernel_budget):
    body = kernel_budget.loop_body(LISTING)
    nonzero = lambda counts: {c: v for c, v in counts.items() if v}  # noqa: E731
    assert body["has_loop"] and body["inner_loops"] == 1
    # the MOV before the loop and the EXIT after it are not counted; the inner loop's MUFU.LG2 and
    # its back edge are cold (static only)
    assert nonzero(body["static"]) == {"mma": 1, "int_mul": 1, "int_other": 1, "sfu": 2, "sync": 1, "fp32": 2,
                                       "uniform": 1, "control": 3}
    assert nonzero(body["hot"]) == {"mma": 1, "int_mul": 1, "int_other": 1, "sfu": 1, "sync": 1, "fp32": 2,
                                    "uniform": 1, "control": 2}
    assert body["cold_instructions"] == 2
    assert nonzero(body["under_mma"]) == {"int_mul": 1, "int_other": 1, "sfu": 1}  # between HGMMA and DEPBAR
    assert body["mufu"] == {"MUFU.SIN": 1}
    # without a main loop the whole kernel counts, the MOV and EXIT included
    whole = kernel_budget.loop_body(LISTING, has_main_loop=False)
    assert not whole["has_loop"] and sum(whole["static"].values()) == 14


def test_budget_of_a_hand_written_listing(kernel_budget, monkeypatch):
    monkeypatch.setattr(kernel_budget, "disassemble", lambda cubin: LISTING)
    monkeypatch.setattr(kernel_budget, "resource_usage", lambda cubin: {"reg": 168, "stack": 0})
    variant = SimpleNamespace(name="hand forward bfloat16", role="forward", config="hand", num_warps=4,
                              constexprs={"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8, "EVEN_K": True},
                              options={"num_stages": 3}, dtype=torch.bfloat16, noise_tile=(64, 32), token_tile=64)
    compiled = SimpleNamespace(asm={"cubin": b""}, metadata=SimpleNamespace(shared=1024))
    entry = kernel_budget.budget(variant, compiled)
    # by hand: 128 threads; hot ALU = IMAD + IMAD.MOV + MUFU.SIN + 2 FFMA = 5; a noise tile of 64 x 32
    # is 16 elements per thread; the wgmma does 2·64·128·16 flops at 4096 per clock = 64 clocks;
    # issue = 9 non-uniform hot instructions = 9 clocks; pipes: IMAD 2, other integer 2, FP32 2, SFU 8;
    # 3 instructions overlap the wgmma, 6 are serial
    assert entry["block"] == {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}
    assert entry["loop_instructions"] == 10 and entry["loop_static_instructions"] == 12
    assert entry["loop_cold_instructions"] == 2 and entry["spills_in_loop"] == 0
    assert entry["alu_instructions"] == 5 and entry["alu_instructions_under_mma"] == 3
    assert entry["noise_elements_per_thread"] == 16 and entry["alu_per_noise_element"] == 0.31
    assert entry["mma_kind"] == "bf16/fp16" and entry["mma_cycles_per_iteration"] == 64
    assert entry["alu_cycles_per_iteration"] == {"issue": 9, "int_mul": 2, "int_other": 2, "fp32": 2, "sfu": 8}
    assert entry["predicted_alu_to_mma_time"] == 0.14  # max(9, 8) / 64
    assert entry["predicted_alu_to_mma_time_pessimistic"] == 0.22  # (2 + 2 + 2 + 8) / 64
    assert entry["predicted_iteration_over_mma_time"] == 1.09  # (6 + max(64, 3)) / 64
    assert entry["registers"] == 168 and entry["stack_bytes"] == 0 and entry["shared_bytes"] == 1024
