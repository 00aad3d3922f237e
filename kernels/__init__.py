"""Triton kernels of beit-fast (installed as beit_fast.kernels); each has a plain-torch *_ref beside it."""
