# FewShotSAM2 server for a department: `fewshotsam2 serve` on Ray Serve, one model replica per GPU.
#
#   docker build -t fewshotsam2-serve .
#   docker run --gpus all -p 8000:8000 -v /srv/fewshotsam2:/config:ro -v fewshotsam2-models:/models \
#       fewshotsam2-serve --token-file /config/tokens.txt --tls-cert /config/cert.pem --tls-key /config/key.pem
#
# /config/tokens.txt: one token per client line (NAME:TOKEN), see README "A GPU server for a department".
# The slice-range estimate and the reverse/lpips methods need the LPIPS AlexNet weights: downloaded to torch's cache
# on first use, or (offline) mount them and add -e FEWSHOTSAM2_LPIPS_WEIGHTS=/config/alexnet_features.pth.
# Not built in the project's CI or by its developers so far (no Docker daemon there): Testing/serve/test_dockerfile.py
# checks what can be checked without one (paths, pins, entrypoint, the wheel `pip install .` builds).
# Inside the container the server listens on 0.0.0.0 (the container's own network), so it requires the token file
# and TLS like any non-loopback address; publish the port only where clients should reach it.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    FEWSHOTSAM2_CACHE=/models RAY_USAGE_STATS_ENABLED=0
# the tested set (scripts/setup_env.sh): PyPI's Linux torch bundles the CUDA libraries; the host needs the NVIDIA
# driver and the container toolkit (`--gpus all`)
RUN pip install torch==2.14.1 torchvision==0.29.1
# sam2 1.1.0 pinned by the SHA256 of its source archive, without its CUDA extension (see README)
RUN echo "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74" > /tmp/sam2.txt \
    && SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps --require-hashes -r /tmp/sam2.txt \
    && rm /tmp/sam2.txt
WORKDIR /opt/fewshotsam2
COPY pyproject.toml README.md LICENSE ./
COPY FewShotSAM2/fewshotsam2 FewShotSAM2/fewshotsam2
RUN pip install ".[serve]"

RUN useradd --create-home --uid 1000 fewshotsam2 && mkdir -p /models && chown fewshotsam2 /models
USER fewshotsam2
VOLUME ["/models"]
EXPOSE 8000
# /healthz needs no token: a liveness probe for the orchestrator
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s CMD \
    python -c "import ssl, urllib.request as u; u.urlopen('https://127.0.0.1:8000/healthz', timeout=4, context=ssl._create_unverified_context())" \
    || python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# the replicas' feature cache in the models volume: it outlives the container (a later job with the same support
# encodes none of its slices again); `--feature-cache off` after the image name turns it off
ENTRYPOINT ["fewshotsam2", "serve", "--host", "0.0.0.0", "--port", "8000", "--feature-cache", "/models/features"]
