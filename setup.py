"""Build the Cython kernels.

All Cython compiler directives live here, in one place. Set ``FASTBP_DEBUG=1`` in the
environment to build with bounds checking, wraparound checks and no optimisation, for
hunting crashes: ``FASTBP_DEBUG=1 pip install .``. ``FASTBP_PORTABLE=1`` builds without
``-march=native``, for any CPU of the architecture.
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTBP_DEBUG", "0") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

# -fno-math-errno: sqrt and friends need not set errno (never read), which lets the
# compiler vectorize the update loops.
# -march=native: the elementwise kernels use the building CPU's vector units (AVX2 and
# FMA where present). FASTBP_PORTABLE=1 builds for any CPU of the architecture.
PORTABLE = os.environ.get("FASTBP_PORTABLE", "0") not in ("", "0")
compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
if not DEBUG and not PORTABLE:
    compile_args.append("-march=native")

extensions = [
    Extension(
        "fastbp._core",
        ["fastbp/_core.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args + ["-fopenmp"],
        extra_link_args=["-fopenmp"],
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
