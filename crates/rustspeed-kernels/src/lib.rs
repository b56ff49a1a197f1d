//! CPU kernels for transformer training, llm.c style: every layer's forward and backward
//! side by side, plain functions over flat slices, f32 accumulation whatever the storage type.
//!
//! Storage types are `f32`, `half::bf16` and `half::f16` (see [`dtype::Float`]).

pub mod activation;
pub mod alloc;
pub mod attention;
pub mod bf16_gemm;
pub mod cross_entropy;
pub mod dropout;
pub mod dtype;
pub mod embedding;
pub mod f32_gemm;
mod gelu_avx512;
pub mod layernorm;
pub mod matmul;
pub mod optim;
pub mod quant;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
#[cfg(test)]
pub mod testing;

pub use dtype::{DType, Float};
