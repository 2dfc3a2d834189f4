"""Data pipeline: sources -> formats -> chat tokenization -> packing -> batches."""
