#![no_std]
// Library target so the workspace can name this crate as a build-dependency of lb-agent;
// the programs live in the `lb-ebpf` binary (src/main.rs).
