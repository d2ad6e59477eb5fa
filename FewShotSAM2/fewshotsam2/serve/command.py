"""`fewshotsam2 serve`: start the Ray Serve application and keep it up until Ctrl-C / SIGTERM.

Every check that can refuse (address, TLS files, token file, limits) runs before Ray starts.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from fewshotsam2.errors import InputError
from fewshotsam2.io.paths import writable_cache_folder
from fewshotsam2.serve.auth import check_listen, generate_token, read_tokens
from fewshotsam2.settings import DEFAULT_FEATURE_CACHE_GB

# Ray (the `serve` extra) is imported when the server starts: `serve --help` and config errors need no Ray

DEFAULT_MAX_UPLOAD_MB = 1024
DEFAULT_MAX_VOXELS = 600_000_000  # a 2000-slice 512 x 512 CT fits
READY = "fewshotsam2 serve: ready"  # the line that says requests are answered (scripts and tests wait for it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve segmentations to other machines: `fewshotsam2 segment --server URL --token-file F` and "
                     "the Slicer module (Run on: server) send their jobs here. Ray Serve runs one model replica per "
                     "GPU (or --replicas); needs the extra [serve].")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "another address needs --token-file and --tls-cert/--tls-key, or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--replicas", type=int, metavar="N", help="model replicas (default: one per GPU, else 1)")
    r.add_argument("--gpus-per-replica", type=float, metavar="F",
                   help="GPU share of each replica (e.g. 0.5: two replicas per GPU); replicas = GPUs / F")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="CPUs Ray reserves per replica "
                   "(default 1)")
    p.add_argument("--threads", type=int, default=0, metavar="T",
                   help="torch threads per replica (default: torch's choice)")
    p.add_argument("--token-file", metavar="F", help="client tokens, one per line (NAME:TOKEN or TOKEN); each token "
                   "owns its jobs. Default: one token is made and printed")
    p.add_argument("--tls-cert", metavar="C", help="TLS certificate (PEM): serve https")
    p.add_argument("--tls-key", metavar="K", help="TLS private key (PEM)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token file or TLS (tokens cross the network in clear)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="M",
                   help=f"largest job upload (default {DEFAULT_MAX_UPLOAD_MB} MB); larger ones are refused (413)")
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="V",
                   help=f"largest volume, in voxels (default {DEFAULT_MAX_VOXELS})")
    p.add_argument("--max-queue", type=int, default=32, metavar="Q",
                   help="waiting jobs past which a submission is refused with 'server busy' (default 32)")
    p.add_argument("--max-jobs-per-client", type=int, default=8, metavar="J",
                   help="queued or running jobs per token (default 8)")
    p.add_argument("--keep-minutes", type=float, default=60.0, metavar="MIN",
                   help="results not fetched are removed this long after their job ends (default 60)")
    p.add_argument("--jobs-dir", metavar="DIR", help="where job inputs and outputs live while a job exists "
                   "(default: a new private temporary folder, removed at exit)")
    p.add_argument("--feature-cache", metavar="DIR|off",
                   help="folder where the replicas keep the SAM2 features of every slice they encode, so that a later "
                        "job with the same support encodes none of its slices again (default: .features in the jobs "
                        "folder, so it lasts as long as --jobs-dir; off: none)")
    p.add_argument("--feature-cache-size", type=float, default=DEFAULT_FEATURE_CACHE_GB, metavar="GB",
                   help=f"bound of the feature cache; least recently used entries go first (default "
                        f"{DEFAULT_FEATURE_CACHE_GB:g}; about 2 MB per slice at 512 px, 8 MB at 1024 px)")
    p.add_argument("--address", default="local", metavar="local|RAY_ADDRESS",
                   help="local (default) starts Ray here; else the address of a running Ray cluster")


def config_from_args(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The application's settings from the flags, checked (raises InputError); and the token made, if any."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    check_listen(args.host, args.token_file is not None, args.tls_cert is not None, args.insecure)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: not a port")
    for flag, value in (("--replicas", args.replicas), ("--gpus-per-replica", args.gpus_per_replica),
                        ("--max-upload-mb", args.max_upload_mb), ("--max-voxels", args.max_voxels),
                        ("--max-queue", args.max_queue), ("--max-jobs-per-client", args.max_jobs_per_client),
                        ("--keep-minutes", args.keep_minutes), ("--feature-cache-size", args.feature_cache_size)):
        if value is not None and value <= 0:
            raise InputError(f"{flag} {value}: must be positive")
    made = None
    if args.token_file:
        tokens = read_tokens(args.token_file)
    else:
        made = generate_token()
        tokens = {made: "client1"}
    return {"tokens": tokens, "max_upload_mb": args.max_upload_mb, "max_voxels": args.max_voxels,
            "max_queue": args.max_queue, "max_per_client": args.max_jobs_per_client,
            "keep_s": args.keep_minutes * 60, "threads": args.threads, "cpus_per_replica": args.cpus_per_replica,
            "replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica}, made


FEATURES_FOLDER = ".features"  # the feature cache's default place in the jobs folder (job ids have no dot)


def feature_cache_config(args: argparse.Namespace, jobs_dir: str) -> dict | None:
    """Where and how large the replicas' shared feature cache is (None: --feature-cache off). The folder is made
    and checked here, before Ray starts, with FeatureCache.from_settings' messages; the replicas build the
    FeatureCache itself (torch: this process never imports it)."""
    where = args.feature_cache if args.feature_cache is not None else str(Path(jobs_dir) / FEATURES_FOLDER)
    if where.strip().lower() == "off":
        return None
    path = writable_cache_folder(where)
    return {"folder": str(path.resolve()), "max_bytes": int(args.feature_cache_size * 1e9)}


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt()


def run(args: argparse.Namespace) -> int:
    config, made = config_from_args(args)
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions
    except ImportError as exc:
        raise InputError(f"`serve` needs Ray Serve: pip install 'fewshotsam2[serve]' ({exc})") from None
    from fewshotsam2.commands.batch_ray import runtime_env  # Ray too
    from fewshotsam2.serve.app import build_app  # Ray too

    own_dir = args.jobs_dir is None
    config["jobs_dir"] = tempfile.mkdtemp(prefix="fewshotsam2-serve-") if own_dir else args.jobs_dir
    ray_started = False
    try:
        Path(config["jobs_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)  # private, before the cache inside
        config["feature_cache"] = feature_cache_config(args, config["jobs_dir"])
        ray.init(address=None if args.address == "local" else args.address, include_dashboard=False,
                 configure_logging=False, runtime_env=runtime_env(), log_to_driver=False)
        ray_started = True
        # Ray's core worker installs a C-level SIGTERM handler that ends this process at once, leaving Ray's own
        # processes behind: take SIGTERM and SIGINT back so the `finally` below shuts Serve and Ray down
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop)
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if config["gpus_per_replica"] is not None and gpus < config["gpus_per_replica"]:
            raise InputError(f"--gpus-per-replica {config['gpus_per_replica']:g}: the Ray cluster has {gpus:g} GPUs")
        if config["gpus_per_replica"] is not None:
            config["replicas"] = max(1, int(gpus // config["gpus_per_replica"]))
        elif config["replicas"] is None:
            config["replicas"] = max(1, int(gpus))
            config["gpus_per_replica"] = 1.0 if gpus >= 1 else 0.0
        if config["gpus_per_replica"] is None:
            config["gpus_per_replica"] = min(1.0, gpus / config["replicas"]) if gpus else 0.0
        cpus = float(resources.get("CPU", 0))
        if config["replicas"] * config["cpus_per_replica"] > cpus:  # Serve would wait for them for ever
            raise InputError(f"{config['replicas']} replicas x --cpus-per-replica {config['cpus_per_replica']:g} is "
                             f"more than the Ray cluster's {cpus:g} CPUs")
        serve.start(http_options=HTTPOptions(host=args.host, port=args.port, ssl_certfile=args.tls_cert,
                                             ssl_keyfile=args.tls_key))
        serve.run(build_app(config), name="fewshotsam2", route_prefix="/")
        scheme = "https" if args.tls_cert else "http"
        print(f"fewshotsam2 serve: {scheme}://{args.host}:{args.port}, {config['replicas']} replica(s) "
              f"({config['gpus_per_replica']:g} GPU each), jobs in {config['jobs_dir']}", flush=True)
        cache = config["feature_cache"]
        print("fewshotsam2 serve: " + (f"slice features kept in {cache['folder']} (up to {cache['max_bytes'] / 1e9:g} "
                                       "GB)" if cache else "no feature cache (--feature-cache off)"), flush=True)
        if made is not None:
            print(f"token (give it to clients: --token-file, or Slicer's server settings): {made}", flush=True)
        print(READY, flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the command line raises it as Terminated)
        print("fewshotsam2 serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        if ray_started:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        if own_dir:
            shutil.rmtree(config["jobs_dir"], ignore_errors=True)
