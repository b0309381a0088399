"""The C++ ops: their sources, their build and their loader (`kernels`)."""
