"""Saliency maps on digits: which pixels move the predicted class's log-probability.

Trains fastbp's MLPClassifier on the digits, then plots, for one test image of each
digit, the image and ``fastbp.inspection.input_gradients`` of the predicted class's
log-probability (red: brighter pixels raise it; blue: they lower it). Writes
docs/saliency.png (needs matplotlib: pip install "fastbp[plot]").

Usage: python docs/saliency.py [output.png]
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from fastbp import MLPClassifier  # noqa: E402
from fastbp.inspection import input_gradients  # noqa: E402


def main(path):
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, random_state=0)
    clf = MLPClassifier((64,), activation="tanh", solver="lbfgs", alpha=1e-2,
                        max_iter=300, random_state=0).fit(X_train, y_train)
    picks = [int(np.flatnonzero(y_test == d)[0]) for d in range(10)]
    saliency = input_gradients(clf, X_test[picks])
    predicted = clf.predict(X_test[picks])
    fig, axes = plt.subplots(2, 10, figsize=(12, 2.8))
    for k, i in enumerate(picks):
        axes[0, k].imshow(X_test[i].reshape(8, 8), cmap="gray_r")
        axes[0, k].set_title(f"pred {predicted[k]}", fontsize=9)
        s = saliency[k].reshape(8, 8)
        lim = np.abs(s).max()
        axes[1, k].imshow(s, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("saliency")
    fig.suptitle(f"d log p(predicted) / d pixel (test accuracy "
                 f"{clf.score(X_test, y_test):.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "saliency.png"))
