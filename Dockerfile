# The bot: python app.py on :3978, state in the Redis named by REDIS_URL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY app.py cli.py ./
COPY orchestrator ./orchestrator
COPY states ./states
COPY adapters ./adapters
COPY simulator ./simulator
COPY examples ./examples
RUN pip install . && useradd --system --uid 10001 bot

USER bot
EXPOSE 3978
# aiohttp finishes in-flight requests on SIGTERM; the scheduler hands back its claims.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3978/readyz', timeout=2)"]
CMD ["python", "app.py"]
