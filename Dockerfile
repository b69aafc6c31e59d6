# kpr's container image, for users who build in their own CI. `cargo xtask image` builds the
# same image without a container engine (umoci and skopeo): the release binary, stripped, and
# exactly the shared libraries it links; no shell, no package manager.
#
#   docker build -t <registry>/kpr:v0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The nightly toolchain with rust-src, bpf-linker and the C libraries kpr links (libnftnl,
# libmnl), as on a developer's machine.
RUN cargo xtask setup
RUN cargo build --release -p kpr --bin kpr \
    && mkdir -p /out/usr/local/bin /out/run /out/tmp \
    && strip -o /out/usr/local/bin/kpr target/release/kpr \
    && for lib in $(ldd target/release/kpr | grep -o '/[^ ]*'); do \
         mkdir -p "/out$(dirname "$lib")" && cp -L "$lib" "/out$lib"; \
       done

FROM scratch
COPY --from=build /out/ /
USER 0:0
ENTRYPOINT ["/usr/local/bin/kpr"]
LABEL org.opencontainers.image.title="kpr" \
      org.opencontainers.image.description="kpr, a kube-proxy replacement with an eBPF dataplane" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
