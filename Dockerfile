# klaviyo-router: the HTTP ingest server and delivery workers, SQLite queue under /data.
#   docker build -t klaviyo-router .
#   docker run -p 8080:8080 -v router-data:/data -e KLAVIYO_PRIVATE_KEY=pk_... klaviyo-router
# Without KLAVIYO_PRIVATE_KEY it runs against a built-in sandbox Klaviyo (nothing leaves the box).
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
RUN pip install --no-cache-dir '.[postgres]' \
    && useradd --system --home-dir /data --create-home router

USER router
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/health'); sys.exit(0)"
ENTRYPOINT ["klaviyo-router"]
CMD ["serve"]
