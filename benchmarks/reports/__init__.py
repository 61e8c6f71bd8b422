"""Tables computed, not timed: K/V memory, FP8 error budget, head parallelism, compile reports of the kernels."""
