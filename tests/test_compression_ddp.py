"""Compressed sync against torch DDP with the matching communication hook (2 gloo processes)."""

import pytest
import torch

import unison
from unison.data import prepare
from unison.models import mlp

from ddp_oracle import ddp_train
from reference import max_abs_diff

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def fit(model, data, **kwargs):
    kwargs = {"backend": "threads", "workers": 2, "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False,
              "val": None} | kwargs
    return unison.fit(model, data, **kwargs)


def test_sync_fp16_equals_ddp_with_fp16_compress_hook(blobs, small_model, tmp_path):
    x, y = blobs
    result = fit(small_model, blobs, strategy="sync(compress=fp16)", momentum=0.9)
    expected = ddp_train(tmp_path, small_model, x, y, hook="fp16", momentum=0.9)
    assert max_abs_diff(result.model, expected) <= 1e-6
    assert max_abs_diff(result.model, fit(small_model, blobs, strategy="sync", momentum=0.9).model) > 0


@pytest.mark.parametrize("rank", [1, 2])
def test_sync_powersgd_equals_ddp_powersgd_hook_from_the_same_first_q(blobs, small_model, tmp_path, rank):
    """Same rank, error feedback, warm start, start_powerSGD_iter=2, min_compression_rate=2,
    and DDP handed unison's first Q: equal up to rounding (DDP's residual is c − the decompressed
    mean, unison's c − its own decompression: the same mean over replicas)."""
    x, y = blobs
    result = fit(small_model, blobs, strategy=f"sync(compress=powersgd({rank}, start=2))", momentum=0.9)
    expected = ddp_train(tmp_path, small_model, x, y, hook="powersgd", momentum=0.9,
                         options={"rank": rank, "start": 2, "seed": 0, "same_q": True})
    assert max_abs_diff(result.model, expected) <= 1e-5
    assert max_abs_diff(result.model, fit(small_model, blobs, strategy="sync", momentum=0.9).model) > 1e-3


def test_sync_powersgd_rank_4_equals_ddp_powersgd_hook(blobs, tmp_path):
    """Rank > 2, where both orthogonalize by torch.linalg.qr (DDP's _orthogonalize); a 64×64
    layer is the one matrix rank 4 compresses here. (Gram-Schmidt would agree too, up to
    rounding: test_compression checks that the QR path is the one taken.)"""
    x, y = blobs
    torch.manual_seed(0)
    model = mlp(8, [64, 64], 3)
    result = fit(model, blobs, strategy="sync(compress=powersgd(4, start=2))", momentum=0.9)
    expected = ddp_train(tmp_path, model, x, y, hook="powersgd", momentum=0.9,
                         options={"rank": 4, "start": 2, "seed": 0, "same_q": True})
    assert max_abs_diff(result.model, expected) <= 1e-5
    assert max_abs_diff(result.model, fit(model, blobs, strategy="sync", momentum=0.9).model) > 1e-3


def test_sync_powersgd_is_within_a_point_of_ddp_powersgd_on_digits(tmp_path):
    """With each one's own first Q (DDP draws it from numpy's RandomState; unison from ``seed``)."""
    data = prepare("digits", seed=0)
    torch.manual_seed(0)
    model = mlp(data.features, [64], data.outputs)
    kwargs = dict(epochs=8, batch_size=32, lr=0.05, momentum=0.9)
    result = fit(model, (data.x, data.y), val=(data.x_val, data.y_val), strategy="sync(compress=powersgd(2, start=10))",
                 **kwargs)
    ddp = ddp_train(tmp_path, model, data.x, data.y, hook="powersgd", options={"rank": 2, "start": 10}, **kwargs)
    with torch.no_grad():
        ddp_acc = float((ddp(data.x_val).argmax(1) == data.y_val).float().mean())
    assert ddp_acc > 0.9
    assert abs(result.final["val_acc"] - ddp_acc) <= 0.01


def test_compressed_strategies_on_processes_equal_threads(blobs, small_model):
    """torch.distributed sends the compressed tensors themselves (fp16/bf16 all-reduce, uint8
    all-gather) and counts the same bytes as threads."""
    for strategy in ("sync(compress=bf16)", "periodic(every=3, compress=int8(block=64))",
                     "diloco(every=4, compress=topk(0.1))", "sync(compress=powersgd(2, start=1))"):
        threads = fit(small_model, blobs, strategy=strategy, momentum=0.9)
        processes = fit(small_model, blobs, strategy=strategy, momentum=0.9, backend="processes")
        assert max_abs_diff(threads.model, processes.model) <= 1e-5, strategy
        assert [r["comm_bytes"] for r in threads.history] == [r["comm_bytes"] for r in processes.history]
