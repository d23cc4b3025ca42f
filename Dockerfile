# STUB: the GPU image (CUDA runtime base, onnxruntime-gpu, non-root, HEALTHCHECK) is delivered by the
# deployment issue. Until then this file only documents the intent and builds a CPU image.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir '.[cpu]'
ENV OFFRAMP_HOST=0.0.0.0
EXPOSE 8000
CMD ["offramp", "serve"]
