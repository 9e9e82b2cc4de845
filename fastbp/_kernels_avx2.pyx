# The kernels compiled for AVX2 and FMA (x86-64-v3: Intel Haswell, AMD Zen and later).
# setup.py sets the flags; _core.pyx chooses among the variants at import.
include "_kernels.pxi"
