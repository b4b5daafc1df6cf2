"""Recalibration's modes and defaults, shared by the library and the CLIs (this module
imports nothing heavy: the CLIs print these in --help)."""

# exact: each BN from its own inputs over all the data, level by level, in inference;
# running: one pass with batch statistics, their average kept (PyTorch's update_bn).
MODES = ("exact", "running")
# Samples per forward pass. Exact statistics do not depend on it (float64 sums, merged
# per batch); it only trades memory for Python overhead.
BATCH_SIZE = 32
