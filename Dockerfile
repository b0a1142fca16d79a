# Two images from one file:
#   docker build --target official --build-arg MODEL=124M -t gpt2-official .   OpenAI's own code, for comparison
#   docker build --target app -t gpt2-numpy .                                    this project's command line
# scripts/compare_with_official.sh builds both and diffs their greedy continuations of a prompt.

# OpenAI's openai/gpt-2 at a pinned commit, in the TensorFlow 1.x it was written for.
FROM tensorflow/tensorflow:1.15.5-py3 AS official
ARG GPT2_COMMIT=a74da5d99abaaba920de8131d64da2862a8f213b
ARG MODEL=124M
ENV LANG=C.UTF-8 PYTHONIOENCODING=UTF-8
WORKDIR /gpt-2
ADD https://github.com/openai/gpt-2/archive/${GPT2_COMMIT}.tar.gz /tmp/gpt-2.tar.gz
# The sources, and a compiler for the old regex release its requirements pin (no wheel exists for it).
# hadolint ignore=DL3008
RUN tar -xzf /tmp/gpt-2.tar.gz --strip-components=1 -C /gpt-2 && rm /tmp/gpt-2.tar.gz \
    && apt-get update && apt-get install -y --no-install-recommends gcc python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && pip3 install --no-cache-dir -r requirements.txt \
    && python3 download_model.py "${MODEL}"
COPY docker/official_greedy.py /gpt-2/src/
ENV MODEL=${MODEL} PYTHONPATH=/gpt-2/src
ENTRYPOINT ["python3", "/gpt-2/src/official_greedy.py"]

# This project: python gpt2.py, with downloaded models kept in a volume.
FROM python:3.11-slim AS app
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --create-home --uid 10001 gpt2 && mkdir /app/models && chown 10001 /app/models
# Every module the scripts import (tests/test_docker.py follows their imports and checks this list).
COPY encoder.py utils.py hf.py cli.py startup.py stopping.py threads.py runs.py \
     gpt2.py gpt2_pico.py train.py score.py export.py ./
USER 10001
VOLUME /app/models
ENTRYPOINT ["python", "gpt2.py"]
