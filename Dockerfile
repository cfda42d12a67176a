# canvas-gateway: multi-stage, slim, non-root. No secrets are baked in: tenants (and
# their Braze keys, by env var or file) are mounted at run time.
#
# BASE_IMAGE is the official Python image by default. CI builds on a Debian bookworm base it
# makes itself with debootstrap (no registry is reachable there): `make image-check`.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Set only where a TLS-intercepting proxy signs PyPI's certificate (CI passes the system bundle).
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The compiled recipient path (service/native, Rust via maturin) is built with Debian's cargo-web (cargo and
# rustc 1.85 on bookworm: service/native/Cargo.lock holds crates that build with it; bookworm's `cargo`,
# 1.63, reads crates.io only through its git index), in this stage only.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cargo-web \
    && rm -rf /var/lib/apt/lists/*
COPY constraints.txt pyproject.toml ./
COPY clients/python ./clients/python
COPY service ./service
# The gateway needs only the generated stubs (clients/python/stubs). The Python client is installed
# beside it for its CLI, `canvas-gateway`: operators' send-demo in a pod, and `make image-check`'s.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./clients/python/stubs ./clients/python . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps ./service/native \
    && /opt/venv/bin/python -c "import canvas_gateway_native"

FROM ${BASE_IMAGE}
# The commit the image was built from, shown by canvas_gateway_build_info: --build-arg GIT_COMMIT=...
ARG GIT_COMMIT=unknown
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CGW_GRPC_ADDRESS=0.0.0.0:50051 \
    CGW_ADMIN_ADDRESS=0.0.0.0:8081 \
    CANVAS_GATEWAY_GIT_COMMIT=$GIT_COMMIT
USER 10001
# 50051: gRPC. 8081: admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 50051 8081
# For plain Docker; Kubernetes uses its own probes on the admin port (deploy/k8s).
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
# Production: mount a tenants file and set CGW_TENANTS_FILE. `docker run IMAGE --demo` runs the demo
# (the fake Braze is in the image for it, and loads only in demo mode).
ENTRYPOINT ["canvas-gateway-server"]
