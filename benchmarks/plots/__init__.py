"""Figures and Markdown tables from the JSON the benchmarks write."""
