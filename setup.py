"""Builds the optional native kernels (plain C, no Python or torch headers; loaded with ctypes).

Everything else is in pyproject.toml. If the compiler or OpenMP is missing, the build of the kernels is skipped
(`optional=True`) and cmpq runs its PyTorch reference path, saying so once.
"""

import platform

from setuptools import Extension, setup

KERNELS = "src/cmpq/kernels"
# one file per ISA and stage (cmpq_kernels.h says which holds what); all built with the flags below
SOURCES = [f"{KERNELS}/{name}.c" for name in
           ("dispatch", "portable", "avx2", "avx512", "int8_avx2", "int8_avx512", "dense", "engine")]
HEADERS = [f"{KERNELS}/{name}.h" for name in ("cmpq_kernels", "avx2", "avx512", "dense", "engine")]

flags = ["-O3", "-std=c11", "-fopenmp", "-fPIC"]
if platform.machine().lower() in ("x86_64", "amd64"):
    flags.append("-march=x86-64")  # portable baseline; AVX2 / AVX-512 paths are chosen at run time

setup(ext_modules=[Extension("cmpq.kernels._lut", sources=SOURCES, depends=HEADERS, include_dirs=[KERNELS],
                             extra_compile_args=flags, extra_link_args=["-fopenmp"], optional=True)])
