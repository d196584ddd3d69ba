# syntax=docker/dockerfile:1
#
# The lb-agent image, for hosts with a container engine and registry access. Without them,
# `cargo xtask image` builds the same image offline (docs/deploy.md, "Build the image").
# Both have the same layout, written by the same code (`lb_image`, in image/): `lb-agent` at
# /usr/local/bin, the shared libraries it links, busybox (`sh`, `grep`, `mount` for the init
# container), /etc/passwd for root and the Debian packages' copyright files, in `FROM scratch`.
#
#   docker build -t ghcr.io/example/lb-agent:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .      (BuildKit: the default builder)
#
# lb-agent/build.rs compiles the eBPF crate (lb-ebpf) with the nightly toolchain and
# bpf-linker through aya-build and embeds the object in the binary, so the builder needs
# what `cargo xtask` installs on a Debian 12 host: LLVM 22, bpf-linker, nightly + rust-src.
# The image is built for the architecture of the build platform.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder

# LLVM 22, which bpf-linker links against. Debian 12 ships it in its security archive
# (source llvm-toolchain-22, version 1:22.1.x-1~deb12u1, suite bookworm-security), which the
# base image's apt sources already list, so no third-party repository is needed. If a
# mirror lacks it, apt.llvm.org has the same package names:
#   curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key -o /etc/apt/keyrings/llvm.asc
#   echo 'deb [signed-by=/etc/apt/keyrings/llvm.asc] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main' \
#     > /etc/apt/sources.list.d/llvm.list
# busybox-static: the image's shell, grep and mount (one static binary); ca-certificates:
# the image's CA bundle (kube's TLS client needs system roots).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev busybox-static ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The eBPF target is built with `-Z build-std=core`: a nightly toolchain with the standard
# library's sources. aya-build runs `rustup run nightly`, so it must be the toolchain named
# `nightly` (not pinned to a date, as in `cargo xtask`).
RUN rustup toolchain install nightly --profile minimal --component rust-src

# The linker aya-build uses for bpfel-unknown-none, built against the LLVM above (the
# version `cargo xtask` installs; its lock file is used).
ARG BPF_LINKER_VERSION=0.13.0
RUN LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 PATH="/usr/lib/llvm-22/bin:${PATH}" \
    cargo install bpf-linker --version "${BPF_LINKER_VERSION}" --locked \
      --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# The workspace's Cargo.lock as committed (--locked). The cache mounts keep the registry and
# the target directory between builds; the root filesystem is written outside them because
# cache mounts are not part of the image. `--rootfs` writes exactly what `cargo xtask image`
# puts in its layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p lb-agent \
 && cargo xtask image --agent target/release/lb-agent --rootfs /rootfs

# Nothing but that root filesystem: the init container's /bin/sh, grep and mount are
# busybox, and `kubectl exec` gets a shell. The binary needs only glibc and libgcc_s (TLS is
# rustls with ring).
FROM scratch

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="lb-agent" \
      org.opencontainers.image.description="Node agent of the eBPF Kubernetes service load balancer" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /rootfs/ /

ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Root: the agent's capabilities (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) are effective only
# for UID 0 in Kubernetes, and the host's bpffs is root's (mode 0700). deploy/daemonset.yaml
# drops every other capability.
USER 0
ENTRYPOINT ["lb-agent"]
CMD ["--help"]
