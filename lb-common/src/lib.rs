//! The map layout shared by the eBPF programs (`lb-ebpf`) and the node agent (`lb-agent`).
//!
//! Everything a map holds is defined here, once: `#[repr(C)]` types with explicit padding,
//! integer fields only (no `bool`, `enum` or `Option`), and compile-time size checks so the
//! two sides can never disagree. With the `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod maps;
pub mod monitor;

pub use maps::*;
pub use monitor::*;
