"""Defaults of a fold's verification, shared by `fold_to_file` and `bn-fold` (this module
imports nothing heavy: the CLI prints these in --help)."""

# Folding reorders float32 arithmetic (x*(W*s) instead of (x*W)*s): errors of a few
# ulp, ~1e-7 of the output's magnitude per layer, growing with depth to ~1e-6 on
# ResNet50-sized models. 1e-5 relative leaves margin and still catches a wrong fold,
# which errs by O(1).
ATOL = 1e-5
RTOL = 1e-5
# Seeded random batches, and images per batch. A wrong fold shows on any input (it is a
# wrong weight, not a rare value), so small batches prove as much as large ones; on
# ResNet50 at 224x224 batches of 8 took 4.2 s of an 11.5 s run, batches of 2 take ~1 s.
SAMPLES = 3
VERIFY_BATCH = 2
