# A CPU image of rerankq (workers with --device cpu, the fast ranker). GPU images come with the compose work.
FROM python:3.11-slim
WORKDIR /app
# A CPU build of torch first, so the project's torch range is met without CUDA wheels.
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md celeryconfig.py ./
COPY tasks tasks
COPY worker worker
COPY producer producer
COPY rerankq rerankq
RUN pip install --no-cache-dir . && useradd --create-home rerankq
USER rerankq
ENTRYPOINT ["rerankq"]
