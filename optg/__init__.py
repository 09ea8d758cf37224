"""The OptG sparsity library."""
