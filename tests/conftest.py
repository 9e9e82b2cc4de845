import os

# scikit-learn's array-API estimator check runs only when SciPy was imported with this
# set; it must be set before anything imports SciPy.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
