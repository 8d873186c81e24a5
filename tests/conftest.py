"""Shared fixtures: tiny CPU models of the block family used across the test suite, and a
loopback stand-in for the Hugging Face Hub (``hub_server``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from torch import nn

from hbll import HBLLModel


class TinyBlock(nn.Module):
    """Residual MLP block on (B, D) hidden_states."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.linear(self.norm(hidden_states)))


def make_tiny_model(num_blocks: int, width: int = 6, num_classes: int = 3, **kwargs) -> HBLLModel:
    stem = nn.Linear(5, width)
    blocks = [TinyBlock(width) for _ in range(num_blocks)]
    head = nn.Linear(width, num_classes)
    return HBLLModel(stem, blocks, head, **kwargs)


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=generator), torch.randint(0, 3, (4,), generator=generator)


HUB_SERVER_SCRIPT = Path(__file__).with_name("hub_server.py")
HUB_SERVER_START_TIMEOUT_S = 20.0
HUB_TEST_TOKEN = "hf_hbll_test_token"


@dataclass
class HubServerHandle:
    """A running ``tests/hub_server.py`` process that the ``huggingface_hub`` client talks to."""

    endpoint: str
    root: Path
    log_path: Path
    process: subprocess.Popen

    def fail(
        self,
        path_contains: str,
        status: int = 500,
        message: str = "Injected failure",
        *,
        method: str | None = None,
        error_code: str | None = None,
        times: int | None = None,
    ) -> None:
        """Make requests whose path contains ``path_contains`` fail with ``status`` and ``message``.

        ``times`` limits the rule to that many requests (default: until ``reset``). Note that
        ``huggingface_hub`` retries 5xx responses with backoff on some calls (preupload, tree
        listing, and commits made by ``upload_folder`` when ``hf_xet`` is installed). A
        permanent 5xx rule on those paths surfaces after 5 retries and about 23 s of waits.
        """
        self._control(
            "POST",
            "/_control/fail",
            {
                "path_contains": path_contains,
                "status": status,
                "message": message,
                "method": method,
                "error_code": error_code,
                "times": times,
            },
        )

    def reset(self) -> None:
        """Remove all injected failures and clear the request log."""
        self._control("POST", "/_control/reset", {})

    def requests(self) -> list[tuple[str, str]]:
        """Return the (method, path with query) pairs the server received since start or ``reset``."""
        return [tuple(entry) for entry in self._control("GET", "/_control/requests")]

    def _control(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        # An empty ProxyHandler keeps HTTP(S)_PROXY settings from routing loopback calls elsewhere.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())


def _start_hub_server(root: Path, port_file: Path, log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(HUB_SERVER_SCRIPT), "--root", str(root), "--port", "0", "--port-file", str(port_file)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + HUB_SERVER_START_TIMEOUT_S
    while not port_file.exists():
        if process.poll() is not None:
            pytest.fail(f"hub_server.py exited with code {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            _stop_process(process)
            pytest.fail(
                f"hub_server.py did not write {port_file} within {HUB_SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()}"
            )
        time.sleep(0.02)
    return process


def _stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _point_huggingface_hub_at(endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every ``huggingface_hub`` call of this process to ``endpoint`` and keep its files under ``hf_home``.

    ``huggingface_hub`` (checked with 2.4.0) reads ``HF_ENDPOINT``, ``HF_HOME`` and the other
    variables into ``huggingface_hub.constants`` at import time. Once it is imported, setting
    the environment has no effect, so this also patches the constants, the module-level
    ``HfApi`` behind ``huggingface_hub.model_info`` and the other module-level functions, and
    the shared ``HfApi`` of transformers. The environment is still set for subprocesses.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api

    environment = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_TOKEN": HUB_TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        existing = [host for host in os.environ.get(name, "").split(",") if host]
        monkeypatch.setenv(name, ",".join([*existing, "127.0.0.1"]))

    # Every path constant under the old HF_HOME (caches, token files, xet cache) moves to hf_home.
    old_home = constants.HF_HOME
    for name, value in list(vars(constants).items()):
        if isinstance(value, str) and (value == old_home or value.startswith(old_home + "/")):
            monkeypatch.setattr(constants, name, str(hf_home) + value[len(old_home) :])
    # These can point outside HF_HOME when their own variables were set before the import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(hf_home / "xet"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # With telemetry on, every request first fetches an agent registry from the endpoint.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        # transformers creates its shared HfApi on first use. Dropping it makes the next use pick up the endpoint.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)


def _install_endpoint_guard(endpoint: str) -> Any:
    """Make the ``huggingface_hub`` HTTP client raise on any request outside ``endpoint``.

    Returns the previous client factory, to be restored with ``set_client_factory``. Only
    the shared synchronous client is guarded, not ``AsyncHfApi`` or hf_xet's own HTTP stack.
    hf_xet stays idle because the server returns ``uploadMode: "regular"`` for every preupload.
    """
    import huggingface_hub
    from huggingface_hub.utils import _http

    allowed_origin = urlsplit(endpoint)[:2]
    previous_factory = _http._GLOBAL_CLIENT_FACTORY

    def reject_other_origins(request: Any) -> None:
        if (request.url.scheme, request.url.netloc.decode()) != allowed_origin:
            raise RuntimeError(f"Blocked request to {request.url}: tests using hub_server may only reach {endpoint}")

    def guarded_factory() -> Any:
        client = previous_factory()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), reject_other_origins]}
        return client

    huggingface_hub.set_client_factory(guarded_factory)
    return previous_factory


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Start ``tests/hub_server.py`` on a free 127.0.0.1 port and point ``huggingface_hub`` at it.

    Yields a ``HubServerHandle`` with ``endpoint``, ``root`` (the server's repo storage),
    ``fail(...)``, ``reset()`` and ``requests()``. The client sends the token
    ``HUB_TEST_TOKEN`` and caches downloads under ``tmp_path / "hf_home"``. Requests from
    the shared ``huggingface_hub`` client to any other origin raise ``RuntimeError``.
    """
    import huggingface_hub

    root = tmp_path / "hub_root"
    server_files = tmp_path / "hub_server"
    server_files.mkdir()
    process = _start_hub_server(root, server_files / "port", server_files / "server.log")
    previous_factory = None
    try:
        port = int((server_files / "port").read_text())
        endpoint = f"http://127.0.0.1:{port}"
        _point_huggingface_hub_at(endpoint, tmp_path / "hf_home", monkeypatch)
        previous_factory = _install_endpoint_guard(endpoint)
        yield HubServerHandle(endpoint=endpoint, root=root, log_path=server_files / "server.log", process=process)
    finally:
        if previous_factory is not None:
            huggingface_hub.set_client_factory(previous_factory)
        _stop_process(process)
