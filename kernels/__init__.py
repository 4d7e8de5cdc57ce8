"""Triton kernels of rtkern, each beside its launcher (installed as ``rtkern.kernels``)."""
