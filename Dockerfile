# The broker as a container: slim Python, non-root, gunicorn with the project's config.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/token-broker

COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-compile . && useradd --system --uid 10001 --no-create-home broker
COPY gunicorn.conf.py ./

USER broker
ENV BROKER_BIND=0.0.0.0:8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
