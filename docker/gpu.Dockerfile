# syntax=docker/dockerfile:1
# GPU image: the rollout service (CUDA vLLM), the trainer (QLoRA, DeepSpeed) and
# the reward service (M_G, M_D, BGE-M3 in bf16 on CUDA).
#
# Built on vLLM's own CUDA image, so vLLM, torch and CUDA come matched; the
# project goes on top with pins that forbid pip to replace torch or vLLM.
# The tag must be a vLLM whose transformers range overlaps the project's
# (pyproject.toml: transformers >=5.16.1,<5.20).
#
#   docker build -f docker/gpu.Dockerfile -t grace-kto-gpu:0.1.0 .
#   docker build -f docker/gpu.Dockerfile --build-arg FLASH_ATTN=1 ...   # + FlashAttention-2 (compiles, slow)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ARG FLASH_ATTN=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/grace \
    GRACE_HOME=/home/grace/.cache/grace

# tini as PID 1: forwards SIGTERM to the whole process group (vLLM's engine
# processes included) and reaps zombies.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 10001 grace \
 && useradd -m -u 10001 -g grace -d /home/grace -s /usr/sbin/nologin grace

WORKDIR /app

# Dependencies first (a cached layer that code changes do not invalidate):
# the base dependencies + the `gpu` extra, minus vLLM (from the base image)
# and flash-attn (needs --no-build-isolation; opt-in with FLASH_ATTN=1).
COPY pyproject.toml ./
RUN python3 -c "from importlib.metadata import version; print(f'torch=={version(\"torch\")}'); print(f'vllm=={version(\"vllm\")}')" > /tmp/pins.txt \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; skip = ('vllm', 'flash-attn'); print('\n'.join(p['dependencies'] + [d for d in p['optional-dependencies']['gpu'] if not d.startswith(skip)]))" > /tmp/requirements.txt \
 && python3 -m pip install -c /tmp/pins.txt -r /tmp/requirements.txt \
 && if [ "$FLASH_ATTN" = "1" ]; then python3 -m pip install -c /tmp/pins.txt --no-build-isolation flash-attn; fi

COPY . .
RUN python3 -m pip install -c /tmp/pins.txt --no-deps -e . \
 && python3 -c "import transformers, peft, FlagEmbedding, shared.cli" \
 && mkdir -p /app/runs /adapters /models \
 && chown grace:grace /app/runs /adapters

USER 10001:10001
EXPOSE 8000 8100
ENTRYPOINT ["tini", "-g", "--"]
CMD ["grace", "serve", "rollout", "--host", "0.0.0.0", "--port", "8000"]
