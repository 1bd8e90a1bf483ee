"""``python -m demo``: the whole service on this machine alone.

Starts a private redis-server and one worker, classifies sample images (or the ones you name),
prints the top-5 of each, then stops everything it started.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
from pathlib import Path

import click

from contract.job import Job
from demo.images import make_jpeg
from demo.stack import RedisServer, WorkerProcess
from producer import Client

SAMPLES = 4


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="resnet50", help="torchvision classification model to serve.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--top-k", default=5, help="Labels printed per image.")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(model: str, device: str, top_k: int, images: tuple[Path, ...]) -> None:
    """Classify IMAGES (default: generated samples) with a private Redis and one worker."""
    with tempfile.TemporaryDirectory(prefix="imgcls-demo-") as tmp:
        workdir = Path(tmp)
        paths = [p.resolve() for p in images] or _samples(workdir)
        weights = _pretrained_or_random(model)
        redis_server = RedisServer(workdir).start()
        roots = sorted({str(p.parent) for p in paths})
        args = ["--weights", weights, "--device", device, "--max-wait-ms", "20"]
        args += [a for root in roots for a in ("--allowed-root", root)]
        worker = WorkerProcess(redis_server.url, model, args, workdir)
        try:
            click.echo(f"starting a {model} worker (log: {worker.log_path.name}) ...", err=True)
            worker.start(timeout=600)
            _classify(redis_server.url, model, paths, top_k)
        finally:
            worker.stop()
            redis_server.stop()


def _samples(workdir: Path) -> list[Path]:
    paths = []
    for seed in range(SAMPLES):
        path = workdir / f"sample-{seed}.jpg"
        path.write_bytes(make_jpeg(500, 375, seed=seed))
        paths.append(path)
    return paths


def _pretrained_or_random(model: str) -> str:
    """DEFAULT when the weights are cached or can be downloaded now; otherwise 'none', said once."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(model).DEFAULT
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub reports downloads on stdout
            weights.get_state_dict(progress=False)
        return "DEFAULT"
    except Exception as e:
        reason = str(e).splitlines()[0][:120]
        click.echo(
            f"Pretrained weights for {model} cannot be had here ({reason}): falling back to "
            "RANDOM weights, so the labels below mean nothing.",
            err=True,
        )
        return "none"
    finally:
        socket.setdefaulttimeout(previous)


def _classify(redis_url: str, model: str, paths: list[Path], top_k: int) -> None:
    client = Client.from_url(redis_url)
    try:
        jobs = client.submit_many([str(p) for p in paths], model=model, top_k=top_k)
        records = client.wait_many([j.id for j in jobs], timeout=300)
    finally:
        client.close()
    for path, record in zip(paths, records, strict=True):
        _print(path, record)
    if any(r is None or r.status != "done" for r in records):
        sys.exit(1)


def _print(path: Path, record: Job | None) -> None:
    click.echo(f"\n{path.name}")
    if record is None or record.predictions is None:
        error = record.error if record is not None else None
        click.echo(f"  {record.status if record else 'missing'}: {error}")
        return
    for p in record.predictions:
        click.echo(f"  {p.probability:8.4f}  {p.label} ({p.index})")


if __name__ == "__main__":
    main()
