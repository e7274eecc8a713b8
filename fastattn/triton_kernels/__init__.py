"""Triton kernels, registered as fastattn::*_triton ops by torch.library.triton_op on import."""
