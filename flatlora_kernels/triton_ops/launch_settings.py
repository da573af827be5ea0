"""Launch settings of the Triton kernels: block sizes and launch options, GPU and interpreter, in one table.

The launchers (:mod:`.perturbed_matmul`, :mod:`.row_norms`) and the ahead-of-time variant list
(:mod:`.aot`) read their block sizes from here. The interpreter runs every kernel with small
blocks so the CPU tests stay fast; a test can force a GPU entry on it
(:func:`flatlora_kernels.testing.forced_matmul_config`).
"""

from __future__ import annotations

import torch

from .common import INTERPRETER


class MatmulConfigTable:
    """Launch configurations of the perturbed matmul, chosen per (dtype, shape class, token class).

    * dtype class: "fp32" or "16bit" (bf16/fp16);
    * shape class: "narrow" when the output has fewer than 128 columns, else "wide";
    * token class: "decode" for at most 64 token rows, else "bulk".

    ``configs`` maps a name to block sizes and launch options; ``entries`` maps each class triple to
    a name; ``packed`` replaces some of those names for a 4-bit W, whose in-register dequantization
    needs registers of its own. Under the interpreter every launch uses ``interpreter``.
    """

    CLASSES = [(d, s, t) for d in ("fp32", "16bit") for s in ("narrow", "wide") for t in ("decode", "bulk")]

    def __init__(self, configs: dict[str, dict], entries: dict[tuple[str, str, str], str], interpreter: dict,
                 packed: dict[str, str] | None = None):
        missing = [key for key in self.CLASSES if key not in entries]
        if missing:
            raise ValueError(f"configuration table has no entry for {missing}")
        packed = packed or {}
        unknown = sorted((set(entries.values()) | set(packed) | set(packed.values())) - set(configs))
        if unknown:
            raise ValueError(f"configuration table names unknown configurations {unknown}")
        self.configs = configs
        self.entries = entries
        self.interpreter = interpreter
        self.packed = packed

    @staticmethod
    def classify(dtype: torch.dtype, tokens: int, out_columns: int) -> tuple[str, str, str]:
        return ("fp32" if dtype == torch.float32 else "16bit", "narrow" if out_columns < 128 else "wide",
                "decode" if tokens <= 64 else "bulk")

    def select(self, dtype: torch.dtype, tokens: int, out_columns: int,
               weight_4bit: bool = False) -> tuple[str, dict]:
        """``(name, configuration)`` of a launch: the interpreter's, or the GPU table's entry for its class."""
        if INTERPRETER:
            return "interpreter", self.interpreter
        name = self.entries[self.classify(dtype, tokens, out_columns)]
        if weight_4bit:
            name = self.packed.get(name, name)
        return name, self.configs[name]

    def distinct(self, dtype: torch.dtype, weight_4bit: bool = False) -> list[tuple[str, dict]]:
        """The configurations a GPU can launch for ``dtype`` (over a 4-bit W with ``weight_4bit``), each once."""
        dtype_class = "fp32" if dtype == torch.float32 else "16bit"
        names = dict.fromkeys(self.packed.get(name, name) if weight_4bit else name
                              for key, name in self.entries.items() if key[0] == dtype_class)
        return [(name, self.configs[name]) for name in names]


def launch_options(config: dict) -> tuple[dict, dict]:
    """Split a configuration into kernel block sizes and launch options (num_warps, num_stages)."""
    blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return blocks, {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


# Chosen from the static SASS budget (benchmarks/kernel_budget.py, benchmarks/NOTES.md section 1),
# by predicted iteration time over MMA time: the noise of a W tile costs the same whatever BLOCK_M
# is, so bulk 16-bit launches serve 256 tokens per regenerated tile; decode-like launches (<= 64
# tokens) use 64-token tiles and 64 W rows so more programs cover W. None has local-memory traffic
# in its K-loop on sm_90. Not yet timed on a GPU. Over a 4-bit W (rows of whole quantization
# blocks), "16bit-bulk-wide" spills in the K-loop (the dequantization's codes and scales on top of
# its 256 x 128 accumulator), so wide outputs take the narrow bulk tiles too.
MATMUL_CONFIGS = MatmulConfigTable(
    configs={
        "fp32-bulk": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        "fp32-decode": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
        "16bit-bulk-wide": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        "16bit-bulk-narrow": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "16bit-decode": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    },
    entries={
        **{("fp32", shape, "bulk"): "fp32-bulk" for shape in ("narrow", "wide")},
        **{("fp32", shape, "decode"): "fp32-decode" for shape in ("narrow", "wide")},
        ("16bit", "wide", "bulk"): "16bit-bulk-wide",
        ("16bit", "narrow", "bulk"): "16bit-bulk-narrow",
        **{("16bit", shape, "decode"): "16bit-decode" for shape in ("narrow", "wide")},
    },
    interpreter=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4),
    packed={"16bit-bulk-wide": "16bit-bulk-narrow"},
)

# The merged-norms kernel: (BLOCK_M, BLOCK_N) rows and columns of W per tile. Over a 4-bit W,
# 32-column tiles keep the dequantization out of local memory on sm_90 (128 columns spill).
ROW_NORMS_BLOCKS = {"dense": (64, 128), "4-bit": (64, 32), "interpreter": (16, 32)}


# The slab writer (slab.py): one program writes a BLOCK_ROWS x BLOCK_COLS tile of the slab, GPU and
# interpreter alike. Column slabs start at multiples of BLOCK_COLS: a 4-bit tile must (load_weight_tile),
# and 32 divides every 4-bit block size in use. 128-row tiles gained 1 ALU instruction per element of
# ~36 for 31 more registers (benchmarks/NOTES.md section 2): not kept.
SLAB_BLOCK = dict(BLOCK_ROWS=64, BLOCK_COLS=32, num_warps=4)


def row_norms_blocks(weight_4bit: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of a merged-norms launch here (the interpreter's under it)."""
    if INTERPRETER:
        return ROW_NORMS_BLOCKS["interpreter"]
    return ROW_NORMS_BLOCKS["4-bit" if weight_4bit else "dense"]
