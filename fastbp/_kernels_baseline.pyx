# The kernels compiled for SSE2 on x86-64, NEON on arm64: the instructions every CPU of the architecture has.
# setup.py sets the flags; _core.pyx chooses among the variants at import.
include "_kernels.pxi"
