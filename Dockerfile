# Loom CPU image (default) or CUDA image (--build-arg BASE=cuda).
#   docker build -t loom .                      # CPU
#   docker build -t loom:cuda --build-arg BASE=cuda .
#   docker run -p 8080:80 -v $HOME/.cache/huggingface:/data loom --model-id Qwen/Qwen2.5-0.5B-Instruct
ARG BASE=cpu

FROM python:3.11-slim AS base-cpu
# The CPU wheel of torch: the default index would pull the multi-GB CUDA build.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# A C++ compiler for Loom's CPU kernels (bf16 GEMM on AVX2 CPUs, decode attention, norms), built with -march=native
# on the serving machine at first start and kept on the volume (one build per CPU); without one, torch's slower ops.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python

FROM base-${BASE}
RUN useradd --create-home --uid 1000 loom
WORKDIR /opt/loom
COPY pyproject.toml README.md ./
COPY loom ./loom
# Installed the same way the README does it (`pip install .`), into a virtual environment.
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data \
    LOOM_CACHE=/data/loom \
    TORCH_EXTENSIONS_DIR=/data/torch_extensions \
    PORT=80
RUN mkdir -p /data && chown loom:loom /data
# Port 80 as a non-root user: Docker ≥ 20.10 sets net.ipv4.ip_unprivileged_port_start=0 in containers.
USER loom
VOLUME /data
EXPOSE 80
# TGI's image listens on port 80 (PORT); /health answers 200 once the engine serves, 503 while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os,urllib.request,sys; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"80\")}/health', timeout=4).status == 200 else 1)"
ENTRYPOINT ["text-generation-launcher"]
