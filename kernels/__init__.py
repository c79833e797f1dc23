"""kernels: compute kernels and their torch reference twins.

Each kernel family has a plain torch reference (what CPU runs) and, where CUDA is present, a
Triton implementation; a dispatcher picks by device, and tests compare the two.
"""
