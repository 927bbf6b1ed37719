"""Load on `mole serve`: concurrent clients, requests per second and p50/p95 latency.

Without ``--url`` it builds the tiny MoLE model (the embedded default, two random LoRA experts and gates) in a
temporary folder, starts ``mole serve`` on a free loopback port, loads it and stops it at the end. Each
client sends its next request as soon as the previous one is answered (a closed loop), so with more clients
than ``--concurrency`` the latency includes the time waiting in the service's queue. Writes
bench/results/serve_load.json.

    python bench/serve_load.py [--clients 1 4 16] [--duration 20] [--steps 4] [--size 64] [--mode mole]
    python bench/serve_load.py --url http://127.0.0.1:8000   # a service already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mole.inject import mole_mode

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def build_tiny_mole(folder: Path) -> tuple[Path, dict[str, Path], Path]:
    """The tiny model, two random rank-4 LoRA experts (raw peft layout) and gates with set biases."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from torch import nn

    from mole.gates_io import save_gates
    from mole.inject import apply_mole
    from mole.tiny import init_tiny_model

    model = init_tiny_model(folder / "model", seed=0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    experts = {}
    for i, name in enumerate(("face", "hand")):
        g = torch.Generator().manual_seed(i + 1)
        tensors = {}
        for module, layer in unet.named_modules():
            if isinstance(layer, nn.Linear) and module.endswith(TARGETS):
                tensors[f"{module}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.2
                tensors[f"{module}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.2
        experts[name] = folder / f"expert-{name}.safetensors"
        save_file(tensors, str(experts[name]))
    mixed = apply_mole(unet, experts)
    with torch.no_grad():
        for pname, p in mixed.named_parameters():
            if pname.endswith("mole_global.bias"):
                p.copy_(torch.tensor([2.0, -1.0]))
    return model, experts, save_gates(mixed, folder / "gates.safetensors")


def direct_seconds(model: Path, experts: dict[str, Path], gates: Path, body: dict, repeats: int = 5) -> float:
    """Median time of the same generation called in-process, without the service: its overhead's yardstick."""
    from mole.generate import generate, load_pipeline

    pipe = load_pipeline(model, experts, gates, device="cpu")
    with mole_mode(pipe.unet, body["mode"]):
        kwargs = {"steps": body["steps"], "width": body["width"], "height": body["height"]}
        generate(pipe, [body["prompt"]], **kwargs)  # warm-up
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            generate(pipe, [body["prompt"]], seed=k, **kwargs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_service(folder: Path, concurrency: int, max_queue: int, parts: tuple) -> tuple[subprocess.Popen, str]:
    model, experts, gates = parts
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mole", "serve", "--model", str(model), "--gates", str(gates), "--port", str(port),
           "--concurrency", str(concurrency), "--max-queue", str(max_queue), "--device", "cpu"]  # fmt: skip
    for name, path in experts.items():
        cmd += ["--experts", f"{name}={path}"]
    log = open(folder / "serve.log", "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mole serve exited: {(folder / 'serve.log').read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError("mole serve was not ready within 300 s")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def load(url: str, clients: int, duration: float, body: dict) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def client(k: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post("/v1/generate", json={**body, "seed": 1000 * k + n})
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            elif r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            n += 1

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")

    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "completed": len(latencies),
        "statuses": statuses,
        "requests_per_s": round(len(latencies) / wall, 3),
        "images_per_s": round(len(latencies) * body.get("num_images", 1) / wall, 3),
        "latency_p50_s": round(pct(0.50), 4),
        "latency_p95_s": round(pct(0.95), 4),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running service; default: start one on the tiny model.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrent clients per run.")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds per run.")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--mode", default="mole")
    parser.add_argument("--concurrency", type=int, default=1, help="--concurrency of the started service.")
    parser.add_argument("--max-queue", type=int, default=8, help="--max-queue of the started service.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    body = {"prompt": "a close-up photo of a smiling woman waving her hand", "steps": args.steps,
            "width": args.size, "height": args.size, "mode": args.mode}  # fmt: skip
    proc = None
    with tempfile.TemporaryDirectory(prefix="mole-serve-load-") as tmp:
        try:
            url, direct = args.url, None
            if url is None:
                parts = build_tiny_mole(Path(tmp))
                direct = direct_seconds(*parts, body)
                print(f"direct generation (no service, same process): {direct:.3f} s")
                proc, url = start_service(Path(tmp), args.concurrency, args.max_queue, parts)
            info = httpx.get(f"{url}/v1/info", timeout=10).json()
            httpx.post(f"{url}/v1/generate", json=body, timeout=600)  # warm-up: first-call allocations
            runs = []
            for clients in args.clients:
                run = asyncio.run(load(url, clients, args.duration, body))
                runs.append(run)
                print(f"{clients:3d} clients: {run['requests_per_s']:.2f} req/s, p50 {run['latency_p50_s']:.3f} s, "
                      f"p95 {run['latency_p95_s']:.3f} s, statuses {run['statuses']}")  # fmt: skip
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)

    import torch

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "service": {"url": args.url or "started by this script (tiny model)", "modes": info["modes"],
                    "concurrency": info["limits"]["concurrency"], "max_queue": info["limits"]["max_queue"]},
        "request": {k: v for k, v in body.items() if k != "prompt"},
        "direct_generate_median_s": None if direct is None else round(direct, 4),
        "runs": runs,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(args.output.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_out, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
