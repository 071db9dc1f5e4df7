# deltakit in a slim image; CPU PyTorch from the PyTorch index keeps the image small.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deltakit ./deltakit
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.1" \
    && pip install .

WORKDIR /data
ENTRYPOINT ["deltakit"]
CMD ["--help"]
