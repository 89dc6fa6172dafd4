"""On a CUDA device (skipped without one; bench/gpu_check.sh runs these on a lent GPU): the
compression math and a torchrun run over NCCL agree with the CPU."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import unison
from unison import compression as cx
from unison.data import prepare
from unison.models import mlp

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

SYNC_RUN = """
[data]
dataset = "moons"
[model]
hidden = [16]
[train]
strategy = "{strategy}"
workers = {workers}
backend = "processes"
epochs = 2
batch_size = 16
lr = 0.1
momentum = 0.9
"""


def test_the_compression_math_on_cuda_equals_the_cpu():
    x = torch.randn(3, 1000) * torch.linspace(0.01, 10, 1000)
    gpu = x.cuda()
    codes, scales = cx.int8_compress(gpu, 256)
    assert torch.equal(codes.cpu(), cx.int8_compress(x, 256)[0])
    assert torch.allclose(cx.int8_decompress(codes, scales, 1000).cpu(), cx.int8_decompress(*cx.int8_compress(x, 256), 1000))
    k = cx.topk_count(1000, 0.01)
    values, indices = cx.topk_compress(gpu, k)
    assert torch.equal(cx.topk_decompress(values, indices, 1000).cpu(),
                       cx.topk_decompress(*cx.topk_compress(x, k), 1000))
    m = cx.orthogonalize(torch.randn(3, 64, 4, device="cuda"))
    assert torch.allclose(m.transpose(-1, -2) @ m, torch.eye(4, device="cuda").expand(3, 4, 4), atol=1e-4)


def _torchrun(tmp_path, strategy: str, nproc: int) -> tuple[subprocess.CompletedProcess, object]:
    run_file, out = tmp_path / "run.toml", tmp_path / "run"
    run_file.write_text(SYNC_RUN.format(strategy=strategy, workers=nproc))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "unison", "train", str(run_file), "--out", str(out), "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300), out


@pytest.mark.multiprocess
@pytest.mark.timeout(320)
@pytest.mark.parametrize("strategy", ["sync", "sync(compress=powersgd(2))", "diloco(every=5, compress=int8)"])
def test_torchrun_over_nccl_equals_threads_on_cpu(tmp_path, strategy):
    nproc = torch.cuda.device_count()  # NCCL: one process per device
    done, out = _torchrun(tmp_path, strategy, nproc)
    assert done.returncode == 0, done.stdout + done.stderr
    data = prepare("moons", seed=0)
    on_threads = unison.fit(lambda: mlp(data.features, [16], data.outputs), data, strategy=strategy,
                            workers=nproc, backend="threads", epochs=2, batch_size=16, lr=0.1, momentum=0.9,
                            progress=False)
    saved = load_file(out / "model.safetensors")
    for name, tensor in on_threads.model.state_dict().items():  # cuBLAS rounds differently: 1e-4, not 1e-5
        assert (saved[name] - tensor).abs().max() <= 1e-4, name


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_more_processes_than_devices_is_refused_naming_nproc_per_node(tmp_path):
    done, _ = _torchrun(tmp_path, "sync", torch.cuda.device_count() + 1)
    assert done.returncode != 0
    assert "--nproc-per-node" in done.stdout + done.stderr and "CUDA device" in done.stdout + done.stderr
