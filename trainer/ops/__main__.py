"""`python -m trainer.ops`: build the C++ ops' library and print where it is."""

from trainer.ops import kernels

kernels.main()
