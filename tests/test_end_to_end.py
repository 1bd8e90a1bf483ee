"""The service as users run it: real redis-server, real worker processes, real S3 endpoint.

One worker serves resnet18 with DEFAULT weights that the test puts in TORCH_HOME's cache; another
serves a TorchScript file. Every expected probability is computed here by the seed's pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from contract import keys
from contract.errors import IdConflict, InvalidRequest, UnsupportedModel
from demo.stack import RedisServer
from producer import Client, SubmitRequest
from tests.support import ROOT, WorkerProcess, make_jpeg

BUCKET = "photos"


class Brightness(nn.Module):
    """A TorchScript model with two classes: is the centre of the image bright or dark?"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m * 4, -m * 4], dim=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[dict]:
    """A private Redis, images on disk and in S3, and two warm workers, shared by this module."""
    root = tmp_path_factory.mktemp("e2e")
    server = RedisServer(root)
    server.start()
    torch_home = root / "torch-home"
    state = _cache_resnet18(torch_home)
    data = root / "data"
    images = _write_inputs(data)
    aws = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="cat/0.jpg", Body=images["photo0"].read_bytes())
    script = root / "brightness.pt"
    torch.jit.save(torch.jit.script(Brightness()), script)
    (root / "labels.txt").write_text("bright\ndark\n")
    common = ["--device", "cpu", "--allowed-root", str(data), "--max-wait-ms", "50"]
    worker_env = {"TORCH_HOME": str(torch_home), **aws}
    workers = [
        WorkerProcess(
            server.url, "resnet18", [*common, "--weights", "DEFAULT"], root, env=worker_env
        ),
        WorkerProcess(
            server.url,
            "brightness",
            [
                *common,
                "--model-file",
                str(script),
                "--labels",
                str(root / "labels.txt"),
                "--resize",
                "64",
                "--crop",
                "32",
            ],
            root,
            env=worker_env,
        ),
    ]
    for w in workers:
        w.start(wait=False)
    for w in workers:
        w.wait_ready(timeout=180)
    client = Client.from_url(server.url)
    yield {
        "client": client,
        "images": images,
        "state": state,
        "url": server.url,
        "workers": workers,
        "data": data,
    }
    client.close()
    for w in workers:
        w.stop()
    server.stop()


def _cache_resnet18(torch_home: Path) -> dict[str, torch.Tensor]:
    """resnet18 weights with a sharpened classifier, so probabilities are far from uniform."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.fc.weight.mul_(40)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / Path(weights.url).name)
    return model.state_dict()


def _write_inputs(data: Path) -> dict[str, Path]:
    data.mkdir()
    paths = {f"photo{i}": data / f"photo{i}.jpg" for i in range(3)}
    for i, path in enumerate(paths.values()):
        path.write_bytes(make_jpeg(500 - 37 * i, 375 + 20 * i, seed=i))
    Image.open(paths["photo1"]).convert("L").save(data / "grey.png")
    paths["grey"] = data / "grey.png"
    paths["truncated"] = data / "truncated.jpg"
    paths["truncated"].write_bytes(make_jpeg(seed=9)[:3000])
    paths["text"] = data / "notes.jpg"
    paths["text"].write_text("these bytes are not an image")
    return paths


def _seed_reference(state: dict[str, torch.Tensor], path: Path, k: int) -> list[tuple[int, float]]:
    """The seed's recipe, verbatim: PIL, Resize(256), CenterCrop(224), ToTensor, Normalize."""
    model = torchvision.models.resnet18()
    model.load_state_dict(state)
    model.eval()
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    image = Image.open(path).convert("RGB")
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(image).unsqueeze(0)), dim=1)[0]
    top = probs.topk(k)
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def test_probabilities_match_the_seed_pipeline(env: dict) -> None:
    names = ["photo0", "photo1", "photo2", "grey"]
    jobs = env["client"].submit_many(
        [str(env["images"][n]) for n in names], model="resnet18", top_k=5
    )
    records = env["client"].wait_many([j.id for j in jobs], timeout=120)
    for name, record in zip(names, records, strict=True):
        assert record.status == "done", record
        expected = _seed_reference(env["state"], env["images"][name], 5)
        got = [(p.index, p.probability) for p in record.predictions]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-4)
        assert record.predictions[0].probability > 0.01  # sharpened: not a uniform guess
        labels = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
        assert record.predictions[0].label == labels[record.predictions[0].index]
        assert record.weights == "ResNet18_Weights.IMAGENET1K_V1"
        assert record.random_weights is False


def test_images_in_s3_are_classified_like_the_same_file_on_disk(env: dict) -> None:
    client = env["client"]
    jobs = client.submit_many(
        [f"s3://{BUCKET}/cat/0.jpg", str(env["images"]["photo0"])], model="resnet18"
    )
    s3_record, disk_record = client.wait_many([j.id for j in jobs], timeout=120)
    assert s3_record.status == "done", s3_record
    assert s3_record.predictions == disk_record.predictions


def test_each_bad_input_fails_with_its_cause_and_the_rest_succeed(env: dict) -> None:
    images = env["images"]
    cases = {
        str(images["photo2"]): None,
        str(env["data"] / "missing.jpg"): "not_found",
        "/etc/hostname": "access_denied",
        str(env["data"] / ".." / "brightness.pt"): "access_denied",
        str(images["text"]): "not_an_image",
        str(images["truncated"]): "not_an_image",
        f"s3://{BUCKET}/no/such/key.jpg": "not_found",
        "s3://no-such-bucket/x.jpg": "not_found",
        str(images["photo0"]): None,
    }
    jobs = env["client"].submit_many(list(cases), model="resnet18")
    records = env["client"].wait_many([j.id for j in jobs], timeout=120)
    for error_type, record in zip(cases.values(), records, strict=True):
        if error_type is None:
            assert record.status == "done", record
        else:
            assert (record.status, record.error.type) == ("failed", error_type), record
            assert record.error.message
    assert all(w.proc.poll() is None for w in env["workers"])


def test_a_torchscript_model_is_served_under_its_own_name(env: dict) -> None:
    client = env["client"]
    job = client.submit(str(env["images"]["photo1"]), model="brightness", top_k=2)
    record = client.wait(job.id, timeout=60)
    assert record.status == "done", record
    assert {p.label for p in record.predictions} == {"bright", "dark"}
    assert record.weights.startswith("torchscript:brightness.pt#")
    assert sum(p.probability for p in record.predictions) == pytest.approx(1.0, abs=1e-5)


def test_workers_only_take_their_own_models_jobs(env: dict) -> None:
    client = env["client"]
    jobs = client.submit_many([str(env["images"]["photo0"])] * 3, model="brightness", top_k=1)
    records = client.wait_many([j.id for j in jobs], timeout=60)
    assert {r.worker for r in records} == {env["workers"][1].worker_id}


def test_unknown_models_are_refused_before_anything_is_queued(env: dict) -> None:
    client = env["client"]
    jobs_before = set(client.redis.scan_iter(match=keys.job_key("*")))
    with pytest.raises(UnsupportedModel, match="python -m worker --model resnet5000"):
        client.submit_many(["a.jpg"], model="resnet5000")
    assert set(client.redis.scan_iter(match=keys.job_key("*"))) == jobs_before
    assert not client.redis.keys(f"{keys.queue_name('resnet5000', '')}*")


def test_top_k_beyond_the_models_classes_is_refused_at_submit(env: dict) -> None:
    with pytest.raises(InvalidRequest, match="from 1 to 2"):
        env["client"].submit("a.jpg", model="brightness", top_k=3)


def test_resubmitting_an_id_never_runs_the_job_twice(env: dict) -> None:
    client = env["client"]
    uri = str(env["images"]["photo0"])
    first = client.submit(uri, model="resnet18", job_id="same-id-1")
    done = client.wait(first.id, timeout=60)
    again = client.submit_many([SubmitRequest(uri, "same-id-1")], model="resnet18")[0]
    assert again == done
    other = SubmitRequest(str(env["images"]["photo1"]), "same-id-1")
    with pytest.raises(IdConflict):  # the same ID for another image: refused, not run
        client.submit_many([other], model="resnet18")
    assert client.wait(first.id, timeout=1) == done


def test_the_cli_submits_waits_and_prints_one_record_per_line_in_order(env: dict) -> None:
    uris = [
        str(env["images"]["photo1"]),
        str(env["data"] / "missing.jpg"),
        str(env["images"]["photo0"]),
    ]
    args = ("--model", "resnet18", "--top-k", "3", "--wait", "60", "--ordered", *uris)
    out = _cli(env, "submit", *args, code=1)  # one job failed
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["uri"] for r in records] == uris
    assert [r["status"] for r in records] == ["done", "failed", "done"]
    assert len(records[0]["predictions"]) == 3
    again = _cli(env, "result", records[0]["id"], records[1]["id"], code=1)
    assert [json.loads(line) for line in again.splitlines()] == records[:2]


def test_the_cli_reads_uris_from_standard_input(env: dict) -> None:
    stdin = f"{env['images']['photo2']}\n\n{env['images']['photo0']}\n"
    out = _cli(env, "submit", "--model", "resnet18", "--wait", "60", "-", stdin=stdin)
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["done", "done"]


def _cli(env: dict, *args: str, stdin: str | None = None, code: int = 0) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "producer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"REDIS_URL": env["url"], "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert result.returncode == code, result.stderr
    return result.stdout
