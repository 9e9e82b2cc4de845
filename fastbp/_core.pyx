# The kernels' entry point: picks, once at import, the compiled variant of the kernels
# (_kernels.pxi and the files it includes from _kernels/) that the running CPU supports,
# and exposes its functions as its own.
#
# One build runs on every CPU of its architecture. setup.py compiles the kernels several
# times: a baseline for the architecture's oldest CPUs, and on x86-64 an AVX2 variant and
# an AVX-512 variant, each as its own extension module. The choice is made here, from the
# CPU's feature bits and the state the operating system saves for it (XCR0): a CPU may
# have AVX-512 units that the OS (or an emulator such as valgrind) does not enable. All
# variants compute bitwise the same results (no floating-point contraction in any of them),
# so the choice changes speed only.
#
# FASTBP_KERNELS=baseline|avx2|avx512 in the environment forces a variant, for tests and
# benchmarks; asking for one the CPU cannot run, or one this build lacks, is an error.
import importlib
import importlib.util
import os

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
    #define FASTBP_X86 1
    #if defined(_MSC_VER) && !defined(__clang__)
    #include <intrin.h>
    static void fastbp_cpuid(unsigned int leaf, unsigned int sub, unsigned int r[4]) {
        int out[4];
        __cpuidex(out, (int) leaf, (int) sub);
        for (int k = 0; k < 4; k++) r[k] = (unsigned int) out[k];
    }
    static unsigned long long fastbp_xcr0(void) { return _xgetbv(0); }
    #else
    #include <cpuid.h>
    static void fastbp_cpuid(unsigned int leaf, unsigned int sub, unsigned int r[4]) {
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    }
    static unsigned long long fastbp_xcr0(void) {
        unsigned int lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        return ((unsigned long long) hi << 32) | lo;
    }
    #endif
    /* Bit k of the result: feature k of fastbp_feature_names, usable by user code. */
    static unsigned int fastbp_cpu_features(void) {
        unsigned int r[4], f = 0, max_leaf;
        unsigned long long xcr0 = 0;
        fastbp_cpuid(0, 0, r);
        max_leaf = r[0];
        if (max_leaf < 1) return 0;
        fastbp_cpuid(1, 0, r);
        unsigned int ecx1 = r[2];
        int osxsave = (ecx1 >> 27) & 1;
        if (osxsave) xcr0 = fastbp_xcr0();
        int avx_state = osxsave && (xcr0 & 0x6) == 0x6;         /* XMM and YMM */
        int zmm_state = avx_state && (xcr0 & 0xE0) == 0xE0;     /* opmask, ZMM */
        if (avx_state && ((ecx1 >> 28) & 1)) f |= 1u << 0;      /* avx */
        if (avx_state && ((ecx1 >> 12) & 1)) f |= 1u << 1;      /* fma */
        if (max_leaf >= 7) {
            fastbp_cpuid(7, 0, r);
            unsigned int ebx7 = r[1];
            if (avx_state && ((ebx7 >> 5) & 1)) f |= 1u << 2;   /* avx2 */
            if (zmm_state) {
                if ((ebx7 >> 16) & 1) f |= 1u << 3;             /* avx512f */
                if ((ebx7 >> 17) & 1) f |= 1u << 4;             /* avx512dq */
                if ((ebx7 >> 28) & 1) f |= 1u << 5;             /* avx512cd */
                if ((ebx7 >> 30) & 1) f |= 1u << 6;             /* avx512bw */
                if ((ebx7 >> 31) & 1) f |= 1u << 7;             /* avx512vl */
            }
        }
        return f;
    }
    #else
    #define FASTBP_X86 0
    static unsigned int fastbp_cpu_features(void) { return 0; }
    #endif
    """
    int X86 "FASTBP_X86"
    unsigned int cpu_feature_bits "fastbp_cpu_features"() noexcept nogil

_FEATURE_NAMES = ("avx", "fma", "avx2", "avx512f", "avx512dq", "avx512cd", "avx512bw",
                  "avx512vl")

# Best first; each with the features its compiler flags assume (see setup.py).
VARIANTS = {
    "avx512": ("avx", "fma", "avx2", "avx512f", "avx512dq", "avx512cd", "avx512bw",
               "avx512vl"),
    "avx2": ("avx", "fma", "avx2"),
    "baseline": (),
}


def cpu_features():
    """The vector features of the running CPU that the OS enables, as a sorted tuple."""
    bits = cpu_feature_bits()
    return tuple(sorted(name for k, name in enumerate(_FEATURE_NAMES) if bits >> k & 1))


def _built(variant):
    """The variant's module, or None when this build lacks it. A variant that is there
    but fails to load is an error, not a reason to fall back silently."""
    name = "fastbp._kernels_" + variant
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _choose():
    """(variant name, module): the forced variant, or the best one this CPU runs."""
    have = set(cpu_features())
    forced = os.environ.get("FASTBP_KERNELS", "").strip().lower()
    if forced:
        if forced not in VARIANTS:
            raise RuntimeError(f"FASTBP_KERNELS={forced!r} is not a kernel variant; "
                               f"choose one of {', '.join(VARIANTS)}")
        missing = [f for f in VARIANTS[forced] if f not in have]
        if missing:
            raise RuntimeError(f"FASTBP_KERNELS={forced!r}, but this CPU (or its OS) "
                               f"lacks {', '.join(missing)}")
        module = _built(forced)
        if module is None:
            raise RuntimeError(f"FASTBP_KERNELS={forced!r}, but this build of fastbp has "
                               f"no {forced} kernels (built: {', '.join(built_variants())})")
        return forced, module
    for name, needs in VARIANTS.items():
        if all(f in have for f in needs):
            module = _built(name)
            if module is not None:
                return name, module
    raise ImportError("fastbp's kernels are not built: no fastbp._kernels_* module")


def built_variants():
    """The kernel variants present in this build, best first.

    Found without importing them: a variant's module is compiled for its instruction
    set throughout, so even importing one the CPU lacks (AVX-512 on an AVX2 machine)
    dies of an illegal instruction.
    """
    return tuple(name for name in VARIANTS
                 if importlib.util.find_spec("fastbp._kernels_" + name) is not None)


VARIANT, _impl = _choose()
globals().update({k: v for k, v in vars(_impl).items() if not k.startswith("__")})
