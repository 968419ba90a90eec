# syntax=docker/dockerfile:1
# CPU image: the judge service, and the reward's CPU variant for small models
# (k8s/variants/reward-cpu, docker-compose.cpu.yml); no CUDA, no vLLM.
#
# torch comes from PyTorch's CPU wheel index at the version pinned in
# scripts/constraints-cpu.txt (a CUDA torch from PyPI would add GBs).
#
#   docker build -f docker/cpu.Dockerfile -t grace-kto-cpu:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/grace \
    GRACE_HOME=/home/grace/.cache/grace

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 10001 grace \
 && useradd -m -u 10001 -g grace -d /home/grace -s /usr/sbin/nologin grace

WORKDIR /app

# Dependencies first (a cached layer that code changes do not invalidate).
COPY pyproject.toml ./
COPY scripts/constraints-cpu.txt /tmp/constraints.txt
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c /tmp/constraints.txt torch \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

COPY . .
RUN pip install -c /tmp/constraints.txt --no-deps -e . \
 && python -c "import torch, transformers, FlagEmbedding, shared.cli; assert not torch.version.cuda, torch.__version__" \
 && mkdir -p /app/runs /models \
 && chown grace:grace /app/runs

USER 10001:10001
EXPOSE 8100 8200
ENTRYPOINT ["tini", "-g", "--"]
CMD ["grace", "serve", "reward", "--host", "0.0.0.0", "--port", "8100"]
