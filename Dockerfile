# kpr's container image, for users who build in their own CI. `cargo xtask image` builds the
# same image without a container engine (umoci and skopeo): the release binary, stripped, and
# exactly the shared libraries it links, and iptables (both backends, its extensions and
# libraries); no shell, no package manager.
#
#   docker build -t <registry>/kpr:v0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The nightly toolchain with rust-src, bpf-linker and the C libraries kpr links (libnftnl,
# libmnl), as on a developer's machine.
RUN cargo xtask setup
# iptables, as `cargo xtask image` stages it: the iptables mode and the eBPF mode's FORWARD
# accept run it.
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
RUN cargo build --release -p kpr --bin kpr \
    && mkdir -p /out/usr/local/bin /out/run /out/tmp \
    && strip -o /out/usr/local/bin/kpr target/release/kpr \
    && for lib in $(ldd target/release/kpr | grep -o '/[^ ]*'); do \
         mkdir -p "/out$(dirname "$lib")" && cp -L "$lib" "/out$lib"; \
       done \
    && mkdir -p /out/usr/sbin /out/usr/lib/x86_64-linux-gnu/xtables \
    && for b in nft legacy; do \
         cp /usr/sbin/xtables-$b-multi /out/usr/sbin/; \
         for lib in $(ldd /usr/sbin/xtables-$b-multi | grep -o '/[^ ]*'); do \
           mkdir -p "/out$(dirname "$lib")" && cp -L "$lib" "/out$lib"; \
         done; \
         for f in iptables ip6tables; do for s in "" -save -restore; do \
           ln -s xtables-$b-multi /out/usr/sbin/$f-$b$s; \
         done; done; \
       done \
    && cp -L /usr/lib/x86_64-linux-gnu/xtables/*.so /out/usr/lib/x86_64-linux-gnu/xtables/

FROM scratch
COPY --from=build /out/ /
USER 0:0
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/usr/local/bin/kpr"]
LABEL org.opencontainers.image.title="kpr" \
      org.opencontainers.image.description="kpr, a kube-proxy replacement with an eBPF dataplane" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
