"""Build the Cython kernels: one portable build, with vector variants chosen at run time.

The kernels (``fastbp/_kernels.pxi``, an index that includes one file per concern from
``fastbp/_kernels/``) are compiled once per instruction-set variant, each as its own
extension module: ``_kernels_baseline`` for every CPU of the architecture and, on x86-64,
``_kernels_avx2`` and ``_kernels_avx512``. ``fastbp/_core.pyx`` picks the best variant
the running CPU supports when fastbp is imported. No variant uses floating-point
contraction (FMA fusion), so all of them give bitwise the same results.

Compiler flags are chosen per compiler: GCC and Clang, Apple Clang (OpenMP from libomp:
``brew install libomp``, or ``FASTBP_OPENMP_PREFIX`` pointing at it) and MSVC. Without a
working OpenMP the build goes on, single-threaded, and says so.

Environment switches, all off by default:

- ``FASTBP_DEBUG=1``: bounds checking, wraparound checks, ``-O0 -g``, baseline only, for
  hunting crashes: ``FASTBP_DEBUG=1 pip install .``.
- ``FASTBP_NATIVE=1``: the baseline variant only, compiled for the building CPU
  (``-march=native``, with the compiler's default FMA contraction). It may not run on
  another CPU, and may round differently; ``benchmarks/bench_build.py`` measures that the
  default build is as fast.

All Cython compiler directives live here, in one place.
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


DEBUG = _flag("FASTBP_DEBUG")
NATIVE = _flag("FASTBP_NATIVE")
X86_64 = platform.machine().lower() in ("x86_64", "amd64", "x64")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

# Vector variants: the compiler flags of each, per compiler family. The features they
# assume are listed in fastbp/_core.pyx (VARIANTS), which checks them at run time.
VECTOR_FLAGS = {
    "gnu": {
        "baseline": [],
        "avx2": ["-mavx", "-mavx2", "-mfma"],
        "avx512": ["-mavx", "-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512cd",
                   "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=512"],
    },
    "msvc": {"baseline": [], "avx2": ["/arch:AVX2"], "avx512": ["/arch:AVX512"]},
}

if DEBUG or NATIVE or not X86_64:
    VARIANTS = ["baseline"]
else:
    VARIANTS = ["baseline", "avx2", "avx512"]


def _compiler_family(compiler):
    """'msvc', 'apple-clang', 'clang' or 'gcc'."""
    if compiler.compiler_type == "msvc":
        return "msvc"
    cc = compiler.compiler_so[0]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "clang" in version.lower():
        return "apple-clang" if "apple" in version.lower() else "clang"
    return "gcc"


def _openmp_flags(family):
    """(compile flags, link flags, include dirs, library dirs) for OpenMP."""
    if family == "msvc":
        return ["/openmp"], [], [], []
    if family == "apple-clang":
        prefixes = [os.environ.get("FASTBP_OPENMP_PREFIX", ""), "/opt/homebrew/opt/libomp",
                    "/usr/local/opt/libomp"]
        prefix = next((p for p in prefixes if p and os.path.isdir(p)), None)
        inc = [os.path.join(prefix, "include")] if prefix else []
        lib = [os.path.join(prefix, "lib")] if prefix else []
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"], inc, lib
    return ["-fopenmp"], ["-fopenmp"], [], []


def _compiles(compiler, source, compile_flags, link_flags, include_dirs, library_dirs):
    """Whether ``source`` compiles and links into a program with these flags."""
    tmp = tempfile.mkdtemp(prefix="fastbp-check-")
    try:
        path = os.path.join(tmp, "check.c")
        with open(path, "w") as f:
            f.write(source)
        objects = compiler.compile([path], output_dir=tmp, include_dirs=include_dirs,
                                   extra_postargs=compile_flags)
        compiler.link_executable(objects, "check", output_dir=tmp,
                                 library_dirs=library_dirs, extra_postargs=link_flags)
        return True
    except Exception:  # CompileError, LinkError or a missing tool: the feature is absent
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPENMP_CHECK = textwrap.dedent("""\
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n == omp_get_max_threads() ? 0 : 1;
    }
    """)

NO_OPENMP = """
************************************************************************************
fastbp: this compiler ({family}) could not build an OpenMP program, so fastbp is built
WITHOUT OpenMP and every kernel runs on one thread. To use all cores:
  - Linux: install GCC (or Clang with libomp-dev);
  - macOS: `brew install libomp` (or set FASTBP_OPENMP_PREFIX to libomp's prefix);
  - Windows: build with MSVC (Visual Studio's C++ tools), which has /openmp.
************************************************************************************
"""


class BuildExt(build_ext):
    """Per-compiler optimisation, vector and OpenMP flags; variants built in parallel."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        family = _compiler_family(self.compiler)
        vector = VECTOR_FLAGS["msvc" if family == "msvc" else "gnu"]
        if family == "msvc":
            base = ["/Od", "/Zi"] if DEBUG else ["/O2", "/fp:precise"]
        else:
            # -fno-math-errno: sqrt need not set errno (never read), so the update loops
            # vectorize. -fno-trapping-math: floating-point status flags are never read,
            # so a loop whose elements select between two computed values (relu, elu,
            # the special cases of _vmath.h) is if-converted and vectorized; it changes
            # no value. -ffp-contract=off: no fused multiply-adds, so that every variant
            # rounds exactly like the baseline. A native build is tuned for its CPU only
            # and keeps the compiler's default contraction.
            base = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
            base.append("-march=native" if NATIVE else "-ffp-contract=off")
        omp_c, omp_l, omp_inc, omp_lib = _openmp_flags(family)
        if not _compiles(self.compiler, OPENMP_CHECK, omp_c, omp_l, omp_inc, omp_lib):
            sys.stderr.write(NO_OPENMP.format(family=family))
            omp_c, omp_l, omp_inc, omp_lib = [], [], [], []
        for ext in self.extensions:
            variant = ext.name.rsplit("_", 1)[-1] if "_kernels_" in ext.name else None
            ext.extra_compile_args = base + (vector[variant] + omp_c if variant else [])
            if variant:
                ext.extra_link_args = omp_l
                ext.include_dirs = ext.include_dirs + omp_inc
                ext.library_dirs = ext.library_dirs + omp_lib
        super().build_extensions()


common = dict(include_dirs=[np.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
extensions = [Extension("fastbp._core", ["fastbp/_core.pyx"], **common)] + [
    Extension(f"fastbp._kernels_{v}", [f"fastbp/_kernels_{v}.pyx"], **common)
    for v in VARIANTS]

setup(ext_modules=cythonize(extensions, compiler_directives=directives,
                             nthreads=os.cpu_count() or 1),
      cmdclass={"build_ext": BuildExt})
