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

# The kernels' source, included by every variant module (_kernels_<isa>.pyx): an index
# that includes one file per concern from fastbp/_kernels/. Cython annotates only a
# module's own lines, so the index is expanded, includes and all, into a module of its own.
PYX = pathlib.Path(__file__).resolve().parents[1] / "fastbp" / "_kernels.pxi"
PARTS = PYX.parent / "_kernels"


def _expanded(path):
    """path's lines with every ``include`` replaced by the included file's lines, and for
    each line where it comes from: (file name relative to fastbp/, line number)."""
    lines, origin = [], []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r'include "([^"]+)"\s*$', line)
        if m:
            sub_lines, sub_origin = _expanded(path.parent / m.group(1))
            lines += sub_lines
            origin += sub_origin
        else:
            lines.append(line)
            origin.append((path.relative_to(PYX.parent).as_posix(), no))
    return lines, origin


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
    lines, origin = _expanded(PYX)
    included = {f for f, _ in origin}
    missing = sorted(p.relative_to(PYX.parent).as_posix() for p in PARTS.glob("*.pxi")
                     if p.relative_to(PYX.parent).as_posix() not in included)
    assert not missing, f"kernel files that _kernels.pxi does not include: {missing}"
    module.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "cython", "-3", "-a", "-I", str(tmp_path),
           "-X", "boundscheck=False", "-X", "wraparound=False", "-X", "cdivision=True",
           "-X", "initializedcheck=False", str(module)]
    subprocess.run(cmd, check=True, capture_output=True)
    html = (src / "_kernels_annotated.html").read_text()
    scores = {int(ln): int(sc) for sc, ln in re.findall(
        r'<pre class="cython line score-(\d+)"[^>]*>.*?<span class="">(\d+)</span>', html)}
    return lines, origin, scores


def test_cdef_kernels_have_no_python_interaction(annotated):
    lines, origin, scores = annotated
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
                offending.append((*origin[no - 1], line.strip()))
    assert n_kernel_lines > 200  # the kernels were found and inspected
    assert offending == []


def test_entry_points_release_the_gil_around_their_loops(annotated):
    lines, origin, scores = annotated
    inside, indent, offending = False, 0, []
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("with nogil:"):
            inside, indent = True, len(line) - len(line.lstrip())
            continue
        if inside and stripped and len(line) - len(line.lstrip()) <= indent:
            inside = False
        if inside and stripped and scores.get(no, 0) > 0:
            offending.append((*origin[no - 1], stripped))
    assert offending == []
