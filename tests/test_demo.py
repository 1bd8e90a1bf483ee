"""The README's first command: the demo starts everything, prints top-k per image, stops it all."""

from __future__ import annotations

import subprocess
import sys

from demo.stack import ROOT


def test_the_demo_classifies_samples_and_says_when_weights_are_random(torch_home: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "demo",
            "--model",
            "mobilenet_v3_small",
            "--device",
            "cpu",
            "--top-k",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
        env={
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "TORCH_HOME": torch_home,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert result.returncode == 0, result.stderr
    blocks = [b.strip() for b in result.stdout.split("\n\n") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == [f"sample-{i}.jpg" for i in range(4)]
    assert all(len(b.splitlines()) == 4 for b in blocks)
    assert "RANDOM weights" in result.stderr
