"""ONNX export of fastbp's estimators, through skl2onnx (the optional extra ``onnx``).

fastbp registers a shape calculator and a converter for each of its estimator classes
with skl2onnx, the first time ``to_onnx`` runs, so skl2onnx converts them alone or
inside a Pipeline (a StandardScaler in front, say) as it converts scikit-learn's own
models. The converters build the graph from ONNX operators: per layer a MatMul and an
Add with the coefficients and intercepts as initializers, then the layer's activation:

- identity, tanh, logistic (Sigmoid), relu: one operator each;
- leaky_relu (LeakyRelu, alpha 0.01), elu (Elu, alpha 1), softplus (Softplus);
- silu: x * Sigmoid(x); gelu (exact): 0.5 * x * (1 + Erf(x / sqrt 2));
- the output: Softmax, Sigmoid, Identity or Exp.

A classifier gives two outputs, as skl2onnx's converters for scikit-learn's do: the
labels (argmax over the classes; 0/1 indicators for multilabel targets) and the
probabilities (``predict_proba``'s columns). Regressors give ``predict``'s values, an
autoencoder ``transform``'s code (the encoder half of the network).
"""
import numpy as np

from ._autoencoder import MLPAutoencoder
from ._estimators import MLPClassifier, MLPRegressor

__all__ = ["to_onnx"]

# The smallest opset with every operator above in its current form (Softmax on axis 1).
TARGET_OPSET = 13
_registered = []


def _activation_list(model):
    names = model.activation
    n_hidden = model.n_layers_ - 2
    return [names] * n_hidden if isinstance(names, str) else list(names)


def _apply(scope, container, name, x, proto_dtype):
    """The activation ``name`` applied to tensor ``x``; returns the result's name."""
    out = scope.get_unique_variable_name(f"{name}_out")
    simple = {"identity": "Identity", "tanh": "Tanh", "logistic": "Sigmoid",
              "relu": "Relu", "softplus": "Softplus", "exp": "Exp"}
    if name in simple:
        container.add_node(simple[name], [x], [out],
                           name=scope.get_unique_operator_name(simple[name]))
    elif name == "softmax":
        container.add_node("Softmax", [x], [out], axis=1,
                           name=scope.get_unique_operator_name("Softmax"))
    elif name == "leaky_relu":
        container.add_node("LeakyRelu", [x], [out], alpha=0.01,
                           name=scope.get_unique_operator_name("LeakyRelu"))
    elif name == "elu":
        container.add_node("Elu", [x], [out], alpha=1.0,
                           name=scope.get_unique_operator_name("Elu"))
    elif name == "silu":
        sig = scope.get_unique_variable_name("sigmoid")
        container.add_node("Sigmoid", [x], [sig],
                           name=scope.get_unique_operator_name("Sigmoid"))
        container.add_node("Mul", [x, sig], [out], name=scope.get_unique_operator_name("Mul"))
    elif name == "gelu":
        consts = {}
        for key, value in (("inv_sqrt2", 1 / np.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            consts[key] = scope.get_unique_variable_name(key)
            container.add_initializer(consts[key], proto_dtype, [], [value])
        scaled, erf, shifted, half = (scope.get_unique_variable_name(n) for n in
                                      ("scaled", "erf", "shifted", "half_x"))
        container.add_node("Mul", [x, consts["inv_sqrt2"]], [scaled],
                           name=scope.get_unique_operator_name("Mul"))
        container.add_node("Erf", [scaled], [erf], name=scope.get_unique_operator_name("Erf"))
        container.add_node("Add", [erf, consts["one"]], [shifted],
                           name=scope.get_unique_operator_name("Add"))
        container.add_node("Mul", [x, consts["half"]], [half],
                           name=scope.get_unique_operator_name("Mul"))
        container.add_node("Mul", [half, shifted], [out],
                           name=scope.get_unique_operator_name("Mul"))
    else:
        raise ValueError(f"no ONNX form for the activation {name!r}")
    return out


def _forward(scope, container, model, x, proto_dtype, np_dtype, upto=None):
    """The network on tensor ``x``: every layer with the output activation, or the first
    ``upto`` layers (all with hidden activations: an autoencoder's code). Returns the
    last tensor's name."""
    acts = _activation_list(model)
    layers = list(zip(model.coefs_, model.intercepts_))[:upto]
    cast = scope.get_unique_variable_name("cast_input")
    container.add_node("Cast", [x], [cast], to=proto_dtype,
                       name=scope.get_unique_operator_name("Cast"))
    a = cast
    for i, (coef, intercept) in enumerate(layers):
        w, b, prod, z = (scope.get_unique_variable_name(n) for n in
                         ("coefficient", "intercept", "mul_result", "add_result"))
        container.add_initializer(w, proto_dtype, list(coef.shape),
                                  coef.astype(np_dtype).ravel().tolist())
        container.add_initializer(b, proto_dtype, [1, len(intercept)],
                                  intercept.astype(np_dtype).tolist())
        container.add_node("MatMul", [a, w], [prod],
                           name=scope.get_unique_operator_name("MatMul"))
        container.add_node("Add", [prod, b], [z], name=scope.get_unique_operator_name("Add"))
        if i == len(model.coefs_) - 1:
            a = _apply(scope, container, model.out_activation_, z, proto_dtype)
        else:
            a = _apply(scope, container, acts[i], z, proto_dtype)
    return a


def _dtypes(operator):
    from skl2onnx.common.data_types import guess_proto_type
    from skl2onnx.proto import onnx_proto

    proto = guess_proto_type(operator.inputs[0].type)
    if proto == onnx_proto.TensorProto.DOUBLE:
        return proto, np.float64
    return onnx_proto.TensorProto.FLOAT, np.float32


def _convert_regressor(scope, operator, container):
    model = operator.raw_operator
    proto, np_dtype = _dtypes(operator)
    y = _forward(scope, container, model, operator.inputs[0].full_name, proto, np_dtype)
    container.add_node("Identity", [y], [operator.outputs[0].full_name],
                       name=scope.get_unique_operator_name("Identity"))


def _autoencoder_shape(operator):
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    model = operator.raw_operator
    kind = DoubleTensorType if isinstance(operator.inputs[0].type, DoubleTensorType) \
        else FloatTensorType
    operator.outputs[0].type = kind([operator.inputs[0].get_first_dimension(),
                                     model._n_features_out])


def _convert_autoencoder(scope, operator, container):
    model = operator.raw_operator
    proto, np_dtype = _dtypes(operator)
    code = _forward(scope, container, model, operator.inputs[0].full_name, proto, np_dtype,
                    upto=model._code_index() + 1)
    container.add_node("Identity", [code], [operator.outputs[0].full_name],
                       name=scope.get_unique_operator_name("Identity"))


def _convert_classifier(scope, operator, container):
    from skl2onnx.proto import onnx_proto

    model = operator.raw_operator
    proto, np_dtype = _dtypes(operator)
    p = _forward(scope, container, model, operator.inputs[0].full_name, proto, np_dtype)
    labels_out, proba_out = operator.outputs[0].full_name, operator.outputs[1].full_name
    if model._label_binarizer.y_type_ == "multilabel-indicator":
        container.add_node("Identity", [p], [proba_out],
                           name=scope.get_unique_operator_name("Identity"))
        half, above = scope.get_unique_variable_name("half"), \
            scope.get_unique_variable_name("above")
        container.add_initializer(half, proto, [], [0.5])
        container.add_node("Greater", [p, half], [above],
                           name=scope.get_unique_operator_name("Greater"))
        container.add_node("Cast", [above], [labels_out], to=onnx_proto.TensorProto.INT64,
                           name=scope.get_unique_operator_name("Cast"))
        return
    if model.n_outputs_ == 1:  # binary: P(class 1) only; stack 1 - p before it
        one, q = scope.get_unique_variable_name("one"), scope.get_unique_variable_name("q")
        container.add_initializer(one, proto, [], [1.0])
        container.add_node("Sub", [one, p], [q], name=scope.get_unique_operator_name("Sub"))
        container.add_node("Concat", [q, p], [proba_out], axis=1,
                           name=scope.get_unique_operator_name("Concat"))
    else:
        container.add_node("Identity", [p], [proba_out],
                           name=scope.get_unique_operator_name("Identity"))
    classes = model.classes_
    index = scope.get_unique_variable_name("argmax")
    container.add_node("ArgMax", [proba_out], [index], axis=1, keepdims=0,
                       name=scope.get_unique_operator_name("ArgMax"))
    if classes.dtype.kind in "biuf":  # float labels are integral (scikit-learn's rule)
        table, kind = classes.astype(np.int64), onnx_proto.TensorProto.INT64
    else:
        table, kind = np.array([str(c).encode("utf-8") for c in classes]), \
            onnx_proto.TensorProto.STRING
    names = scope.get_unique_variable_name("classes")
    container.add_initializer(names, kind, [len(table)], table.tolist())
    container.add_node("Gather", [names, index], [labels_out], axis=0,
                       name=scope.get_unique_operator_name("Gather"))


def _register():
    if _registered:
        return
    try:
        from skl2onnx import update_registered_converter
        from skl2onnx.common.shape_calculator import (
            calculate_linear_classifier_output_shapes,
            calculate_linear_regressor_output_shapes)
    except ImportError:
        raise ImportError("ONNX export needs skl2onnx and onnx: "
                          "pip install 'fastbp[onnx]'") from None
    update_registered_converter(
        MLPClassifier, "FastbpMLPClassifier", calculate_linear_classifier_output_shapes,
        _convert_classifier, options={"zipmap": [False, True, "columns"],
                                      "nocl": [False, True]})
    update_registered_converter(
        MLPRegressor, "FastbpMLPRegressor", calculate_linear_regressor_output_shapes,
        _convert_regressor)
    update_registered_converter(
        MLPAutoencoder, "FastbpMLPAutoencoder", _autoencoder_shape, _convert_autoencoder)
    _registered.append(True)


def _classifiers(model):
    steps = [s for _, s in model.steps] if hasattr(model, "steps") else [model]
    return [s for s in steps if isinstance(s, MLPClassifier)]


def to_onnx(model, X_sample, *, target_opset=TARGET_OPSET):
    """Export a fitted fastbp model as an ONNX model.

    Parameters
    ----------
    model : MLPClassifier, MLPRegressor, MLPAutoencoder or Pipeline
        A fitted fastbp estimator, or a fitted scikit-learn Pipeline of convertible steps
        (a ``StandardScaler``, say) ending in one.
    X_sample : ndarray of shape (n_samples, n_features)
        A few rows of input: their dtype (float32 or float64) and width fix the graph's
        input type.
    target_opset : int, default=13
        The ONNX opset to target (13 or later).

    Returns
    -------
    onnx_model : onnx.ModelProto
        The graph. A classifier's outputs are ``label`` (class labels, or 0/1 indicators
        for multilabel targets) and ``probabilities`` (``predict_proba``'s columns, as an
        array: no ZipMap); a regressor's is ``variable`` (``predict``'s values, 2-D); an
        autoencoder's is ``transform``'s code.

    Raises
    ------
    ImportError
        Without the optional extra: ``pip install 'fastbp[onnx]'``.
    TypeError
        When ``model`` has no fastbp estimator.
    ValueError
        When the model is not fitted, or ``X_sample`` is not a 2-D float array with the
        model's number of features.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_iris
    >>> import fastbp
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = fastbp.MLPClassifier((8,), solver="lbfgs", random_state=0).fit(X, y)
    >>> onx = fastbp.to_onnx(clf, X[:2].astype(np.float32))
    >>> import onnxruntime as ort
    >>> sess = ort.InferenceSession(onx.SerializeToString())
    >>> labels, proba = sess.run(None, {"X": X.astype(np.float32)})
    >>> bool((labels == clf.predict(X)).all())
    True
    """
    last = model.steps[-1][1] if hasattr(model, "steps") else model
    if not isinstance(last, (MLPClassifier, MLPRegressor, MLPAutoencoder)):
        raise TypeError("to_onnx exports a fastbp MLPClassifier, MLPRegressor or "
                        "MLPAutoencoder, or a Pipeline ending in one; got "
                        f"{type(last).__name__}")
    if not hasattr(last, "_theta"):
        raise ValueError("the model is not fitted: call fit before to_onnx")
    X_sample = np.asarray(X_sample)
    if X_sample.ndim != 2 or X_sample.dtype not in (np.float32, np.float64):
        raise ValueError("X_sample must be a 2-D float32 or float64 array, got "
                         f"{X_sample.ndim}-D {X_sample.dtype}")
    n_features = getattr(model, "n_features_in_", last.n_features_in_)
    if X_sample.shape[1] != n_features:
        raise ValueError(f"X_sample has {X_sample.shape[1]} features, but the model takes "
                         f"{n_features}")
    if (isinstance(target_opset, bool) or not isinstance(target_opset, (int, np.integer))
            or target_opset < TARGET_OPSET):
        raise ValueError(f"target_opset must be an integer >= {TARGET_OPSET}, got "
                         f"{target_opset!r}")
    _register()
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    kind = DoubleTensorType if X_sample.dtype == np.float64 else FloatTensorType
    options = {id(clf): {"zipmap": False} for clf in _classifiers(model)}
    return convert_sklearn(model, initial_types=[("X", kind([None, n_features]))],
                           target_opset={"": int(target_opset), "ai.onnx.ml": 1},
                           options=options)
