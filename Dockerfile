# deltakit in a slim image: the CLI as entrypoint, `deltakit serve` by default, as a non-root user.
# CPU PyTorch from PyTorch's own index (as the Makefile takes it on Linux) keeps the image small: PyPI's
# Linux wheels bundle CUDA. For a CUDA image, drop --index-url or point it at a CUDA index.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DELTAKIT_HOME=/data/deltakit
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY deltakit ./deltakit
COPY service ./service
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.1" \
    && pip install . \
    && useradd --create-home --uid 10001 deltakit \
    && mkdir -p /data/deltakit && chown -R deltakit /data

USER deltakit
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["deltakit"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
