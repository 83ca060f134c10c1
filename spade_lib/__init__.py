"""SPADE: sparsity-guided debugging of image classifiers."""
