"""`salaconvert distill` runs on several processes unchanged (SPEC §5: `accelerate launch`).

Two CPU processes (torchrun, gloo) split every global batch, average gradients and reduce the held-out
perplexity; they must end where one process ends on the same global batches, and write one
checkpoint and one metrics file, not two.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_close
from tiny import save_tiny_teacher

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def hybrid_pair(tmp_path_factory):
    from typer.testing import CliRunner

    from salaconvert.cli import app

    folder = tmp_path_factory.mktemp("mp")
    teacher = save_tiny_teacher(folder / "teacher")
    result = CliRunner().invoke(app, ["convert", str(teacher), "--out", str(folder / "hybrid")])
    assert result.exit_code == 0, result.output
    return teacher, folder / "hybrid"


def _distill(launch: list[str], hybrid, teacher, text_file, out) -> dict:
    args = [*launch, str(BIN / "salaconvert"), "distill", str(hybrid), "--teacher", str(teacher), "--data",
            str(text_file), "--recipe", "debug/tiny", "--set", "runtime.checkpoint_every=0", "--out", str(out), "--json"]
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def _weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_two_processes_end_with_the_single_process_weights(hybrid_pair, text_file, tmp_path):
    teacher, hybrid = hybrid_pair
    one = _distill([sys.executable], hybrid, teacher, text_file, tmp_path / "one")
    # torchrun, which `accelerate launch --multi_gpu` wraps; on CPUs accelerate picks gloo from its environment
    two = _distill([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], hybrid, teacher, text_file,
                   tmp_path / "two")
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["tokens"] == one["tokens"]  # the same global batches, split over the processes
    for stage in ("1", "2"):
        assert_close(torch.tensor(two["losses"][stage]["last"]), torch.tensor(one["losses"][stage]["last"]), rtol=1e-4,
                     what=f"stage {stage} last loss, 2 processes vs 1")
    assert_close(torch.tensor(two["perplexity"]["student_after"]), torch.tensor(one["perplexity"]["student_after"]), rtol=1e-4,
                 what="held-out perplexity reduced over 2 processes vs 1")
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    before = _weights(hybrid)
    trained = [k for k in w1 if not (w1[k] == before[k]).all()]
    assert trained, "distillation changed no weight"
    for k in trained:
        assert_close(w2[k], w1[k], rtol=1e-4, what=f"{k}: 2 processes vs 1")
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())  # main process only
