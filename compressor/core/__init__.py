"""The mathematics: decompositions, statistics, factor-space SVD, rank rules, Fisher passes. Torch only, no I/O."""
