"""Shared by the service tests: a tiny MoLE model on disk and the service on a loopback port in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import torch
from tests.conftest import make_peft_expert

from mole.serve import Service, ServiceSettings, create_app

#: Gate biases of the tiny MoLE: the face expert's global gate open, the hand expert's mostly closed.
GLOBAL_BIAS = (2.0, -1.0)


def build_tiny_mole(model_dir: Path, folder: Path) -> tuple[dict[str, Path], Path]:
    """Two LoRA experts written by diffusers (``save_lora_weights``) and a gates file with known biases."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from mole.gates_io import save_gates
    from mole.inject import apply_mole

    experts: dict[str, Path] = {}
    for name, seed in (("face", 1), ("hand", 2)):
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        state = make_peft_expert(unet, name, rank=4, alpha=8.0, seed=seed)
        out = folder / f"expert-{name}"
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config[name].to_dict()
        )
        experts[name] = out / "pytorch_lora_weights.safetensors"
    unet = apply_mole(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"), experts)
    with torch.no_grad():  # gates away from their init, so that MoLE differs from "+experts" at weight 1
        for name, p in unet.named_parameters():
            if name.endswith("mole_global.bias"):
                p.copy_(torch.tensor(GLOBAL_BIAS))
    return experts, save_gates(unet, folder / "gates.safetensors")


class ServerThread:
    """uvicorn serving ``service`` on 127.0.0.1 (a socket bound to port 0: no free-port race) in a thread."""

    def __init__(self, service: Service, wait_ready: bool = True) -> None:
        import uvicorn

        self.service = service
        self.wait_ready = wait_ready
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(service), log_level="warning", timeout_graceful_shutdown=30, lifespan="on", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died while starting"
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.02)
        if self.wait_ready:
            assert self.service.wait_loaded(120), f"the model did not load: {self.service.error}"
        return self

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()
        self.sock.close()

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def serve(pipe, **settings) -> ServerThread:
    """A started service over an already loaded pipeline."""
    return ServerThread(Service(lambda: pipe, ServiceSettings(**settings), description="tiny"))
