use which::which;

/// Building this crate depends on the `bpf-linker` binary, which cargo cannot express as a
/// dependency: rebuild whenever that binary changes (aya-template's approach).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found on PATH: run `cargo xtask build-ebpf`, which installs it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
