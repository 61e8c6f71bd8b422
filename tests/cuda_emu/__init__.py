"""The CUDA emulation: csrc/ kernels compiled with g++ and run on the CPU (see README.md)."""
