"""Every public object has a numpydoc docstring whose Examples run."""
import doctest
import inspect

import pytest

import fastbp
import fastbp.distributed
import fastbp.inspection

PUBLIC = ([getattr(fastbp, name) for name in fastbp.__all__]
          + [getattr(fastbp.distributed, name) for name in fastbp.distributed.__all__]
          + [getattr(fastbp.inspection, name) for name in fastbp.inspection.__all__])


def _public_members(obj):
    yield obj
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if not name.startswith("_") and callable(member):
                yield member


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_public_object_documented_with_example(obj):
    doc = inspect.getdoc(obj)
    assert doc and "Examples" in doc, f"{obj.__name__} needs an Examples section"
    assert "Parameters" in doc or "Attributes" in doc or not callable(obj)


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_examples_run(obj):
    if obj.__name__ == "to_onnx":  # the optional extra 'onnx' (a test requirement)
        pytest.importorskip("skl2onnx")
        pytest.importorskip("onnxruntime")
    finder = doctest.DocTestFinder(recurse=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(obj, obj.__name__, globs={}) if t.examples]
    assert tests, f"{obj.__name__} has no runnable examples"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_public_methods_have_docstrings(obj):
    missing = [m.__name__ for m in _public_members(obj) if not inspect.getdoc(m)]
    assert missing == []
