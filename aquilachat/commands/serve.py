"""``aquilachat serve``: the HTTP server (original AquilaChat API and OpenAI-compatible API)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ._common import add_engine_args, add_model_args, engine_kwargs

#: The port of the original AquilaChat server.
DEFAULT_PORT = 7000
#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "AQUILACHAT_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    from ..server.limits import DEFAULT_MAX_WAITING
    p = sub.add_parser("serve", help="serve a model over HTTP (original API and OpenAI-compatible API)",
                       description="Serve a model over HTTP: POST / (the original AquilaChat API), "
                                   "POST /func and /stream_func (FlagAI's Aquila server API), "
                                   "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, "
                                   "GET /health, GET /metrics, GET /openapi.json and /docs. Requests are "
                                   "batched continuously; prompt prefixes are cached (--no-prefix-caching).")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV} if set, else no authentication)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model as given)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV-token budget for admission (prompt + max_tokens per sequence; "
                        "default max-num-seqs * context)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help=f"sequences that may queue for a slot before requests get 429 (default {DEFAULT_MAX_WAITING})")
    p.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                   help="comma-separated web origins (e.g. https://app.example.com) whose pages may call this "
                        "server besides its own chat page; requests with another Origin get 403 (default: none)")
    g = p.add_argument_group("images", "carry out AquilaChat's #text2image# / #InstructFace# answers and serve "
                                       "/v1/images/* (diffusers pipelines need: pip install 'aquilachat[image]')")
    g.add_argument("--image-model", metavar="DIR", default=None,
                   help="a diffusers text-to-image pipeline directory (AltDiffusion, Stable Diffusion, ...)")
    g.add_argument("--image-edit-model", metavar="DIR", default=None,
                   help="a diffusers image-edit pipeline directory taking image= (e.g. InstructPix2Pix)")
    g.add_argument("--image-url", metavar="URL", default=None,
                   help="an OpenAI-compatible images API base (e.g. http://host:8000/v1) for what the "
                        "directories above do not cover")
    g.add_argument("--image-api-key", default=None, help="API key of --image-url")
    g.add_argument("--image-steps", type=int, default=None, help="denoising steps per image (default: the pipeline's)")
    g.add_argument("--run-instructions", action="store_true",
                   help="carry out image instructions in every chat answer (a request can still say "
                        "aquilachat.run_instructions: false); off: only requests that ask")
    p.add_argument("--log-prompts", action="store_true", help="log prompts and answers (off by default)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("replicas on Ray Serve (pip install 'aquilachat[ray]'; see docs/serving.md)")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N replicas of the engine as a Ray Serve deployment behind this server's API "
                        "(default: one engine in this process, no Ray)")
    g.add_argument("--ray-address", default=None, metavar="auto|HEAD:PORT",
                   help="the Ray cluster to run the replicas on: 'auto' (the one this node joined with "
                        "'ray start') or its address (default: a local Ray, started and stopped with the server)")
    g.add_argument("--threads-per-replica", type=int, default=None, metavar="T",
                   help="torch threads (and Ray CPUs) of each replica (default: the cluster's CPUs / replicas)")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_backends(args: argparse.Namespace):
    """``(text2image, edit)`` backends from ``--image-model``, ``--image-edit-model`` and
    ``--image-url`` (the URL serves whichever of the two no directory gives).

    Raises:
        ImageBackendError: a directory that is not a diffusers pipeline, or diffusers missing.
    """
    from ..images import DiffusersBackend, OpenAIImagesBackend
    if args.image_steps is not None and args.image_steps < 1:
        from ..errors import ValidationError
        raise ValidationError(f"--image-steps must be >= 1, got {args.image_steps}")
    device = None if args.device == "auto" else args.device
    remote = OpenAIImagesBackend(args.image_url, api_key=args.image_api_key) if args.image_url else None
    text2image = (DiffusersBackend(args.image_model, device=device, num_inference_steps=args.image_steps)
                  if args.image_model else remote)
    edit = (DiffusersBackend(args.image_edit_model, device=device, num_inference_steps=args.image_steps)
            if args.image_edit_model else remote)
    return text2image, edit


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..checkpoint import Checkpoint
    from ..errors import ValidationError
    from ..llm import LLM
    from ..server.app import ServerSettings, create_app

    for name in ("max_num_seqs", "max_model_len", "kv_cache_tokens", "num_scheduler_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValidationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_waiting < 0:
        raise ValidationError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.replicas is None:
        for name in ("ray_address", "threads_per_replica"):
            if getattr(args, name) is not None:
                raise ValidationError(f"--{name.replace('_', '-')} needs --replicas")
    else:
        for name in ("replicas", "threads_per_replica"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValidationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        from ..server.replicas import require_ray
        require_ray()  # a missing extra fails here, in one line
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a wrong --model, or a model that cannot fit, fails here in one line, before the server starts
    ckpt = Checkpoint.open(args.model)
    kwargs = engine_kwargs(args)
    plan = ckpt.plan_memory(**{k: kwargs[k] for k in ("device", "dtype", "quantization", "max_num_seqs",
                                                      "max_model_len", "kv_cache_memory")})
    logging.getLogger("aquilachat.server").info("memory plan: %s; dtype: %s", plan.summary(), plan.dtype_reason)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        logging.getLogger("aquilachat.server").warning(
            "serving on %s without an API key: anyone who can reach this address can use the model", args.host)
    settings = ServerSettings(model_name=args.served_model_name or args.model, api_key=api_key,
                              max_waiting=args.max_waiting, log_prompts=args.log_prompts,
                              allowed_origins=tuple(args.allowed_origins.split(",")),
                              run_instructions=args.run_instructions)
    text2image, image_edit = image_backends(args)

    if args.replicas is None:
        def loader() -> LLM:
            # the plan's decisions, explicitly: the loader thread sizes nothing again
            return LLM(ckpt, template=args.template, device=plan.device, dtype=plan.dtype,
                       quantization=args.quantization,
                       max_num_seqs=plan.num_slots, max_model_len=plan.max_model_len,
                       kv_cache_tokens=args.kv_cache_tokens, kv_cache_memory=plan.kv_cache_bytes,
                       enable_prefix_caching=args.enable_prefix_caching,
                       num_scheduler_steps=args.num_scheduler_steps)
    else:
        from ..server.replicas import ReplicaConfig, connect, deploy
        # each replica plans its memory on its own node, from the same options
        config = ReplicaConfig(model=args.model, threads=args.threads_per_replica, settings=settings,
                               llm_kwargs={**kwargs, "template": args.template, "kv_cache_tokens": args.kv_cache_tokens})
        connect(args.ray_address)

        def loader():  # the replicas load the model; this process routes to them
            return deploy(config, args.replicas, max_num_seqs=plan.num_slots, local=args.ray_address is None)

    failed: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(loader, settings, on_load_error=on_load_error, text2image=text2image, image_edit=image_edit,
                     remote=args.replicas is not None)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if failed:
        print(f"aquilachat serve: error: loading {args.model} failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0
