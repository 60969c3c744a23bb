"""The weight-sync and control endpoints of `camopd serve`, with SGLang 0.5.23's request and answer shapes and
its refusals (`entrypoints/http_server.py`, `managers/io_struct.py`, `scheduler_components/weight_updater.py`).

    POST /pause_generation {mode: abort|retract|in_place}    POST /continue_generation {torch_empty_cache}
    GET|POST /flush_cache                                    POST /update_weight_version {new_version}
    POST /begin_weight_update {selector}                     POST /end_weight_update {}
    POST /update_weights_from_disk {model_path, weight_version, flush_cache, ...}
    POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name, backend}
    POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version, ...}
    POST /destroy_weights_update_group {group_name}          GET|POST /get_weights_by_name {name, truncate_size}
    GET /server_info (and its deprecated alias /get_server_info)

As on SGLang: every POST here needs a JSON body (`{}` at least; none -> 400 "Field required"); distributed
updates only run inside a weight-update session (begin ... end; a second begin, an end without begin, an update
outside one -> 400); `GET /get_weight_version` does not exist (the version is in `/model_info`). Updates run in
the server's single worker thread (never under a running batch) and set the weight version there, only when
the request names one. A body field that is not in SGLang's request struct is refused with 400 naming it (SGLang
ignores it: this server is stricter, so a client typo shows here; `tests/served/test_contract.py` checks that
these field sets are SGLang's own); failures answer `{"success": false, "message": ...}` with 400, as SGLang
does.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Set as AbstractSet
from typing import Any

from aiohttp import web

from ..rollout.sglang_protocol import SGLANG_VERSION, max_input_tokens
from .generation import STATE_KEY, ServeState, WorkBatcher

_PAUSE_MODES = ("abort", "retract", "in_place")
STANDIN_VERSION = "camopd-serve"
# The fields of SGLang 0.5.23's request structs (managers/io_struct.py; `rid` and `http_worker_ipc` are on every
# one), per control endpoint: what this server accepts, and what the contract test compares with SGLang's own.
_BASE = frozenset({"rid", "http_worker_ipc"})
CONTROL_FIELDS: dict[str, frozenset[str]] = {
    "/pause_generation": _BASE | {"mode"},
    "/continue_generation": _BASE | {"torch_empty_cache"},
    "/begin_weight_update": _BASE | {"selector"},
    "/end_weight_update": _BASE,
    "/update_weight_version": _BASE | {"new_version", "abort_all_requests"},
    "/update_weights_from_disk": _BASE
    | {
        "model_path",
        "load_format",
        "abort_all_requests",
        "weight_version",
        "is_async",
        "torch_empty_cache",
        "keep_pause",
        "recapture_cuda_graph",
        "token_step",
        "flush_cache",
        "manifest",
    },
    "/init_weights_update_group": _BASE
    | {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
    "/destroy_weights_update_group": _BASE | {"group_name"},
    "/update_weights_from_distributed": _BASE
    | {
        "names",
        "dtypes",
        "shapes",
        "group_name",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "load_format",
        "selector",
        "torch_empty_cache",
    },
    "/get_weights_by_name": _BASE | {"name", "truncate_size"},
}
_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _Bad(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


async def _body(
    request: web.Request, allowed: AbstractSet[str], required: AbstractSet[str] = frozenset(), need_body: bool = True
) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if need_body:  # FastAPI's `Body()`: SGLang answers 400 with a "Field required" validation error
            raise _Bad("body", "Field required (send a JSON object, {} at least)")
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Bad("body", f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Bad("body", "request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise _Bad(key, "unknown field")
    for key in sorted(required):
        if body.get(key) is None:
            raise _Bad(key, "is required")
    return body


def _fail(message: str, status: int = 400) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=status)


def _ok(message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": True, "message": message, **extra})


def _need_weights(state: ServeState) -> None:
    if not hasattr(state.model, "load_from_disk"):
        raise _Bad("model", "this server (--backend hf) cannot update its weights; serve with --backend megatron")


def _version(body: dict[str, Any]) -> str | None:
    v = body.get("weight_version")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
        raise _Bad("weight_version", f"must be a string, got {v!r:.40}")
    return None if v is None else str(v)


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _Bad(key, f"must be an integer in [{low}, {high}], got {v!r:.40}")
    return v


async def _in_worker(state: ServeState, fn, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(state.pool, fn, *args)


def add_weight_routes(app: web.Application, batcher_key: web.AppKey) -> None:
    """Register the endpoints on `app` (whose STATE_KEY and `batcher_key` entries are set at start-up)."""

    def handler(fn):
        async def wrapped(request: web.Request) -> web.Response:
            try:
                return await fn(request, request.app[STATE_KEY])
            except _Bad as exc:
                return _fail(str(exc))

        return wrapped

    async def pause(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(request, CONTROL_FIELDS["/pause_generation"])
        mode = body.get("mode", "abort")
        if mode not in _PAUSE_MODES:
            raise _Bad("mode", f"must be one of {', '.join(_PAUSE_MODES)}, got {mode!r:.40}")
        state.running.clear()
        if mode == "abort":
            state.abort_epoch += 1
            batcher: WorkBatcher = request.app[batcher_key]
            batcher.abort_waiting()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(request: web.Request, state: ServeState) -> web.Response:
        await _body(request, CONTROL_FIELDS["/continue_generation"])
        state.running.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(request: web.Request, state: ServeState) -> web.Response:
        return web.Response(text="Cache flushed.\n")  # decoding keeps no cache between batches

    async def begin(request: web.Request, state: ServeState) -> web.Response:
        await _body(request, CONTROL_FIELDS["/begin_weight_update"])
        if state.update_session:
            return _fail("a weight-update session is already open; call end_weight_update() first")
        state.update_session = True
        return _ok("Success")

    async def end(request: web.Request, state: ServeState) -> web.Response:
        await _body(request, CONTROL_FIELDS["/end_weight_update"])
        if not state.update_session:
            return _fail("no weight-update session is open; call begin_weight_update() first")
        state.update_session = False
        return _ok("Success")

    async def set_version(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(request, CONTROL_FIELDS["/update_weight_version"], {"new_version"})
        state.weight_version = _version({"weight_version": body["new_version"]}) or state.weight_version
        return web.json_response(
            {
                "success": True,
                "message": f"Weight version updated to {state.weight_version}",
                "new_version": state.weight_version,
            }
        )

    async def from_disk(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(request, CONTROL_FIELDS["/update_weights_from_disk"], {"model_path"})
        _need_weights(state)
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise _Bad("load_format", f"only auto/safetensors, got {body['load_format']!r:.40}")
        path, version = body["model_path"], _version(body)
        if not isinstance(path, str):
            raise _Bad("model_path", "must be a string")

        def work() -> str:
            msg = state.model.load_from_disk(path)
            if version is not None:
                state.weight_version = version
            return msg

        try:
            msg = await _in_worker(state, work)
        except Exception as exc:  # noqa: BLE001 -- a bad path or architecture is the caller's problem: 400
            return _fail(f"model_path: {type(exc).__name__}: {exc}")
        return _ok(msg + (f" Weight version updated to {version}." if version else ""), num_paused_requests=0)

    async def init_group(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(
            request,
            CONTROL_FIELDS["/init_weights_update_group"],
            {"master_address", "master_port", "rank_offset", "world_size"},
        )
        _need_weights(state)
        world = _int(body, "world_size", 2, 1 << 16)
        args = dict(
            master_address=str(body["master_address"]),
            master_port=_int(body, "master_port", 1, 65535),
            rank_offset=_int(body, "rank_offset", 1, world - 1),
            world_size=world,
            group_name=str(body.get("group_name", "weight_update_group")),
            backend=str(body.get("backend", "nccl")),
        )
        import torch

        if args["backend"] not in ("gloo", "nccl") or (args["backend"] == "nccl" and not torch.cuda.is_available()):
            raise _Bad("backend", f"{args['backend']!r} is not available here (gloo on CPU, nccl on GPU)")
        try:
            await _in_worker(state, lambda: state.model.init_group(**args))
        except Exception as exc:  # noqa: BLE001
            return _fail(f"{type(exc).__name__}: {exc}")
        return _ok(f"joined weights update group {args['group_name']} as rank {args['rank_offset']}")

    async def destroy_group(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(request, CONTROL_FIELDS["/destroy_weights_update_group"])
        _need_weights(state)
        name = str(body.get("group_name", "weight_update_group"))
        try:
            await _in_worker(state, state.model.destroy_group, name)
        except KeyError:
            raise _Bad("group_name", f"no weights update group named {name!r}") from None
        return _ok(f"destroyed weights update group {name}")

    async def from_distributed(request: web.Request, state: ServeState) -> web.Response:
        body = await _body(request, CONTROL_FIELDS["/update_weights_from_distributed"], {"names", "dtypes", "shapes"})
        _need_weights(state)
        if not state.update_session:
            return _fail(
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            )
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        group = str(body.get("group_name", "weight_update_group"))
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not len(
            names
        ) == len(dtypes) == len(shapes):
            raise _Bad("names", "names, dtypes and shapes must be lists of equal length")
        if not all(isinstance(n, str) for n in names):
            raise _Bad("names", "must be strings")
        total = 0
        for i, (dt, shape) in enumerate(zip(dtypes, shapes)):
            if dt not in _DTYPES:
                raise _Bad(f"dtypes[{i}]", f"{dt!r:.40} is not one of {', '.join(_DTYPES)}")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise _Bad(f"shapes[{i}]", f"must be a list of non-negative integers, got {str(shape)[:60]}")
            total += math.prod(shape) * _DTYPES[dt]
        limit = 2 * sum(math.prod(s) * 4 for s in state.model.hf_shapes().values())
        if total > limit:
            raise _Bad("shapes", f"{total} bytes in one bucket, more than twice the model's fp32 size")
        if group not in state.model.groups:
            raise _Bad("group_name", f"no weights update group named {group!r}; call /init_weights_update_group")
        version = _version(body)

        def work() -> int:
            n = state.model.receive(names, dtypes, shapes, group)
            if version is not None:
                state.weight_version = version
            return n

        try:
            n = await _in_worker(state, work)
        except Exception as exc:  # noqa: BLE001
            return _fail(f"{type(exc).__name__}: {exc}")
        return _ok(
            f"received {len(names)} tensors ({n} applied)"
            + (f" Weight version updated to {version}." if version else "")
        )

    async def get_weights(request: web.Request, state: ServeState) -> web.Response:
        body = (
            await _body(request, CONTROL_FIELDS["/get_weights_by_name"], {"name"})
            if request.method == "POST" or request.can_read_body
            else dict(request.query)
        )
        _need_weights(state)
        name = body.get("name")
        if not isinstance(name, str):
            raise _Bad("name", "is required (a HF parameter name)")
        size = body.get("truncate_size", 100)
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise _Bad("truncate_size", f"must be an integer, got {size!r:.40}") from None
        try:
            tensor = await _in_worker(state, state.model.hf_weight, name)
        except KeyError:
            raise _Bad("name", f"{name!r} is not a weight of the served model") from None
        return web.json_response(tensor.float()[:size].tolist())

    async def server_info(request: web.Request, state: ServeState) -> web.Response:
        info = state.model.model_info()
        return web.json_response(
            {
                "version": STANDIN_VERSION,
                "sglang_contract": SGLANG_VERSION,  # the SGLang release whose protocol this server follows
                "context_length": state.context_len,
                "max_req_input_len": max_input_tokens(state.context_len) + 1,  # an input must be shorter
                "weight_version": state.weight_version,
                "tp_size": 1,
                "dp_size": 1,
                "pp_size": 1,  # one worker joins an update group
                "enable_deterministic_inference": True,  # sampling_seed is always honoured here
                "model_path": info.get("model_path"),
                "tokenizer_path": info.get("tokenizer_path"),
                "can_generate": state.can_generate,
                "paused": not state.running.is_set(),
            }
        )

    r = app.router
    r.add_post("/pause_generation", handler(pause))
    r.add_post("/continue_generation", handler(resume))
    r.add_route("GET", "/flush_cache", handler(flush_cache))
    r.add_post("/flush_cache", handler(flush_cache))
    r.add_post("/update_weight_version", handler(set_version))
    r.add_post("/begin_weight_update", handler(begin))
    r.add_post("/end_weight_update", handler(end))
    r.add_post("/update_weights_from_disk", handler(from_disk))
    r.add_post("/init_weights_update_group", handler(init_group))
    r.add_post("/destroy_weights_update_group", handler(destroy_group))
    r.add_post("/update_weights_from_distributed", handler(from_distributed))
    r.add_get("/get_weights_by_name", handler(get_weights))
    r.add_post("/get_weights_by_name", handler(get_weights))
    r.add_get("/server_info", handler(server_info))
    r.add_get("/get_server_info", handler(server_info))  # SGLang's deprecated alias
