//! Fused optimizer kernels over flat fp32 buffers.
