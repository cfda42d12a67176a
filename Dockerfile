# canvas-gateway: multi-stage, slim, non-root. No secrets are baked in: tenants (and
# their Braze keys, by env var or file) are mounted at run time.
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml ./
COPY clients/python ./clients/python
COPY service ./service
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ./clients/python .

FROM python:3.11.7-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CGW_GRPC_ADDRESS=0.0.0.0:50051
USER 10001
EXPOSE 50051
STOPSIGNAL SIGTERM
# Production: mount a tenants file and set CGW_TENANTS_FILE. `docker run IMAGE --demo` runs the demo.
ENTRYPOINT ["canvas-gateway-server"]
