"""The benchmarks of relaxkv_kernels, run from the root of the tree: ``python -m benchmarks`` lists them.

ops: one op against the device's bandwidth, and the per-op microbenchmarks; chunk: one chunk step of ``KVCache``
(device time, host time, against video length); end_to_end: relaxkv_gen's model and diffusers' with the cache;
reports: memory and error tables, compile reports of the kernels; plots: figures and tables from the results.
"""
