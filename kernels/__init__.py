"""Triton kernels of lgc_fast, installed as ``lgc_fast.kernels``. Import a module here only where Triton is usable."""
