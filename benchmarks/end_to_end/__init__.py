"""Whole models with the cache: relaxkv_gen's generator (eager, graphs, compiled, ranks, long streams), diffusers."""
