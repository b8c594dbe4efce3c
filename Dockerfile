# klaviyo-router: the HTTP ingest server and delivery workers, SQLite queue under /data.
#   docker build -t klaviyo-router .
#   docker run -p 8080:8080 -v "$PWD/data:/data" --user "$(id -u):$(id -g)" klaviyo-router
# /data holds the queue, the generated write key (data/write_key on the host) and, without
# KLAVIYO_PRIVATE_KEY, the sandbox's journal (data/sandbox.ndjson; GET /sandbox/state on port 8080).
# -e KLAVIYO_PRIVATE_KEY=pk_... delivers for real; `serve --config /data/router.toml` uses a config.
# The postgres extra (asyncpg) is in: deploy/compose.yaml runs three of these on one PostgreSQL queue.
# tests/test_dockerfile.py installs and runs the package the way this file does.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KLAVIYO_ROUTER_DATA_DIR=/data \
    KLAVIYO_ROUTER_HOST=0.0.0.0 \
    KLAVIYO_ROUTER_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mappings ./mappings
COPY router ./router
# /data is writable by any user: the container may run as the owner of a bind-mounted folder
# (--user), so what it writes there is the host user's; a named volume starts from this folder.
RUN pip install --no-cache-dir '.[postgres]' \
    && useradd --system --no-create-home router \
    && mkdir -p /data && chmod 1777 /data

USER router
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('KLAVIYO_ROUTER_PORT', '8080') + '/health')"
ENTRYPOINT ["klaviyo-router"]
CMD ["serve"]
