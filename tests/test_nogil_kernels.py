"""``cython -a`` on the kernels: no Python interaction inside any cdef kernel.

Cython's annotation scores every source line by how much Python C-API it calls. Inside
``cdef ... noexcept nogil`` functions every line must score 0. ``def`` entry points may
touch Python only outside their ``with nogil:`` blocks (argument unpacking, return).
"""
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

# The kernels' source, included by every variant module (_kernels_<isa>.pyx). Cython
# annotates only a module's own lines, so the source is annotated as a module of its own.
PYX = pathlib.Path(__file__).resolve().parents[1] / "fastbp" / "_kernels.pxi"


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("annotate")
    # Both come with the checkout and the test extra: missing, they fail this check
    # instead of skipping it.
    assert PYX.exists(), f"{PYX} is missing: these tests run from a checkout"
    assert importlib.util.find_spec("Cython"), "Cython is missing: pip install '.[test]'"
    src = tmp_path / "fastbp"
    shutil.copytree(PYX.parent, src, ignore=shutil.ignore_patterns("*.so", "*.c"))
    module = src / "_kernels_annotated.pyx"
    module.write_text(PYX.read_text())
    cmd = [sys.executable, "-m", "cython", "-3", "-a", "-I", str(tmp_path),
           "-X", "boundscheck=False", "-X", "wraparound=False", "-X", "cdivision=True",
           "-X", "initializedcheck=False", str(module)]
    subprocess.run(cmd, check=True, capture_output=True)
    html = (src / "_kernels_annotated.html").read_text()
    scores = {int(ln): int(sc) for sc, ln in re.findall(
        r'<pre class="cython line score-(\d+)"[^>]*>.*?<span class="">(\d+)</span>', html)}
    return module.read_text().splitlines(), scores


def test_cdef_kernels_have_no_python_interaction(annotated):
    lines, scores = annotated
    assert scores, "annotation produced no line scores"
    func, sig_open, offending, n_kernel_lines = "", False, [], 0
    for no, line in enumerate(lines, 1):
        if re.match(r"(cdef|def|cpdef)\s", line):
            func, sig_open = line, not line.rstrip().endswith(":")
        elif sig_open:  # a signature spread over several lines
            func += line
            sig_open = not line.rstrip().endswith(":")
        if func.startswith("cdef") and "nogil" in func and line.strip():
            n_kernel_lines += 1
            if scores.get(no, 0) > 0:
                offending.append((no, line.strip()))
    assert n_kernel_lines > 200  # the kernels were found and inspected
    assert offending == []


def test_entry_points_release_the_gil_around_their_loops(annotated):
    lines, scores = annotated
    inside, indent, offending = False, 0, []
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("with nogil:"):
            inside, indent = True, len(line) - len(line.lstrip())
            continue
        if inside and stripped and len(line) - len(line.lstrip()) <= indent:
            inside = False
        if inside and stripped and scores.get(no, 0) > 0:
            offending.append((no, stripped))
    assert offending == []
