"""Datasets, tokenizers and Grain input pipelines."""
