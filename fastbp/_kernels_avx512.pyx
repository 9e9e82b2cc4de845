# The kernels compiled for AVX-512 F/CD/BW/DQ/VL (x86-64-v4: Intel Skylake-SP, AMD Zen 4 and later).
# setup.py sets the flags; _core.pyx chooses among the variants at import.
include "_kernels.pxi"
