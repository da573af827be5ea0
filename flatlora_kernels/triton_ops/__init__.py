"""Triton kernels: noise tiles, merged row norms and the perturbed matmul."""
