# Backpropagation kernels for dense multilayer perceptrons: the index of fastbp/_kernels/.
#
# This file is compiled once per instruction-set variant (``_kernels_baseline.pyx``,
# ``_kernels_avx2.pyx``, ``_kernels_avx512.pyx`` include it); ``_core.pyx`` picks the
# variant the running CPU supports at import and re-exports its names. Every variant is
# built without floating-point contraction, so all of them compute bitwise the same
# results: only their speed differs.
#
# Design
# ------
# A network with L weight layers has sizes s_0 (features) .. s_L (outputs). All of its
# parameters live in one flat vector ``theta`` in scikit-learn's packing order: W_1 .. W_L
# (each (s_{l-1}, s_l), row-major), then b_1 .. b_L. ``w_off[l]`` and ``b_off[l]`` give
# where layer l+1's coefficients and intercepts start. Gradients, curvature products, the
# Fisher diagonal and the optimizers' states have the same layout.
#
# Rows are processed in blocks of at most ``block`` rows: forward Z_l = A_{l-1} W_l +
# 1 b_l^T, A_l = f_l(Z_l); backward Delta_{l-1} = (Delta_l W_l^T) .* f_{l-1}'(A_{l-1}),
# each hidden layer with its own activation f_l, whose derivative comes from A_l (or,
# for gelu, silu and softplus, from a second array K_l that only their layers keep; see
# block_pass.pxi).
# Full-batch passes spread blocks over threads and sum them exactly, so results do not
# depend on the thread count (exact_sums.pxi); a minibatch epoch runs as one team of
# threads over fixed chunks (epoch.pxi).
#
# Everything declared ``cdef ... noexcept nogil`` allocates nothing and never touches
# Python: the ``def`` entry points (called through ``_core`` by fastbp/_network.py,
# _stochastic.py and distributed.py) validate every argument, take workspaces that Python
# allocated (see the ``*_size`` functions), release the GIL once per call and turn
# status codes into exceptions. tests/test_nogil_kernels.py checks every file below.
#
# The files, each included after those it uses (included text is read in order, so a
# definition must come before its use):
#   common.pxi      cimports, OpenMP stand-ins, activation/output codes, Spec and Input
#   layers.pxi      elementwise activations, output loss and delta, sparse first layer
#   block_pass.pxi  workspace layout, forward/backward over one block, gradient finish
#   exact_sums.pxi  fixed-point accumulators; full-batch loss_grad, forward, merge/finish
#   inspection.pxi  per-sample deltas and input gradients; dropout's mask, for tests
#   updates.pxi     SGD and Adam steps
#   unit_split.pxi  a minibatch step split by hidden units (run_epoch's 'units' mode)
#   epoch.pxi       the minibatch epoch: shuffle, team barrier, reduce_and_step
#   curvature.pxi   R-operator: Gauss-Newton and Hessian products
#   fisher.pxi      empirical-Fisher diagonal
#   tools.pxi       build info, test and benchmark hooks
include "_kernels/common.pxi"
include "_kernels/layers.pxi"
include "_kernels/block_pass.pxi"
include "_kernels/exact_sums.pxi"
include "_kernels/inspection.pxi"
include "_kernels/updates.pxi"
include "_kernels/unit_split.pxi"
include "_kernels/epoch.pxi"
include "_kernels/curvature.pxi"
include "_kernels/fisher.pxi"
include "_kernels/tools.pxi"
