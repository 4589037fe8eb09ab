"""Native mixed-precision LUT kernels (C, runtime ISA dispatch, OpenMP) and their ctypes bindings."""
