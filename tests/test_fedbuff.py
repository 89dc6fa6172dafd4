"""fedbuff (asynchronous local SGD, Nguyen et al. 2022): a run, replayed from its recorded arrival
order, equals a sequential simulation of that order; point-to-point messages; bad options."""

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import unison
from unison import merges
from unison.comm.threads import ThreadComm, ThreadGroup
from unison.errors import ConfigError
from unison.history import write_jsonl
from unison.strategies import FedBuff, parse

from reference import max_abs_diff, sampler_order

TOL = 1e-5
SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.5}
STRATEGY = "fedbuff(every=3, buffer=2, server_lr=0.8, server_momentum=0.5, staleness=0.5)"


def fedbuff_reference(model, x, y, order, *, workers, every, buffer, server_lr, server_momentum, staleness,
                      epochs, batch_size, lr, momentum, seed=0):
    """FedBuff (Algorithm 1) run one arrival at a time in ``order`` (worker indices): the worker
    trains its next chunk of local steps from the last model it was sent, the server buffers
    (1+τ)^-a·Δ and every ``buffer`` arrivals steps SGD(server_lr, server_momentum) on the mean;
    the arriving worker gets the server's model. A last, partly filled buffer is its own mean."""
    n = len(x)
    steps_per_epoch = math.ceil(len(sampler_order(n, workers, 0, 0, seed)) / batch_size)
    total = steps_per_epoch * epochs
    cuts = list(range(every, total + 1, every))
    cuts += [] if cuts and cuts[-1] == total else [total]

    def chunks(w):
        batches = [sampler_order(n, workers, w, e, seed)[i * batch_size:(i + 1) * batch_size]
                   for e in range(epochs) for i in range(steps_per_epoch)]
        for start, end in zip([0] + cuts, cuts):
            yield batches[start:end]

    replicas = [copy.deepcopy(model) for _ in range(workers)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replicas]
    server = copy.deepcopy(model)
    server_optimizer = torch.optim.SGD(server.parameters(), lr=server_lr, momentum=server_momentum)
    plans = [chunks(w) for w in range(workers)]
    started, version, pending = [0] * workers, 0, []

    def apply(size):
        nonlocal version
        for i, p in enumerate(server.parameters()):
            p.grad = sum((1 + tau) ** -staleness * change[i] for change, tau in pending) / size
        server_optimizer.step()
        version += 1
        pending.clear()

    for w in order:
        m = replicas[w]
        start = [p.detach().clone() for p in m.parameters()]
        for batch in next(plans[w]):
            optimizers[w].zero_grad()
            F.cross_entropy(m(x[batch]), y[batch]).backward()
            optimizers[w].step()
        pending.append(([s - p.detach() for s, p in zip(start, m.parameters())], version - started[w]))
        if len(pending) == buffer:
            apply(buffer)
        with torch.no_grad():
            for p, q in zip(m.parameters(), server.parameters()):
                p.copy_(q)
        started[w] = version
    if pending:
        apply(len(pending))
    return server


def arrival_order(result):
    return [a[0] for record in result.history for a in record["arrivals"]]


def reference_of(result, model, data, workers):
    s = result.config.strategy
    return fedbuff_reference(model, *data, arrival_order(result), workers=workers, every=s.every, buffer=s.buffer,
                             server_lr=s.server_lr, server_momentum=s.server_momentum, staleness=s.staleness,
                             **SETTINGS)


def fit(model, data, **kwargs):
    return unison.fit(model, data, **({"backend": "threads", "progress": False} | SETTINGS | kwargs))


def test_a_threads_run_equals_a_sequential_simulation_of_its_arrival_order(blobs, small_model):
    result = fit(small_model, blobs, strategy=STRATEGY, workers=3)
    order = arrival_order(result)
    assert sorted(order) == [0] * 3 + [1] * 3 + [2] * 3  # sends after steps 3, 6 and 8 of each worker
    stalenesses = [a[2] for record in result.history for a in record["arrivals"]]
    assert max(stalenesses) >= 1  # the third worker's first change is always stale
    assert [r["version"] for r in result.history] == [1, 2, 3, 4, 5]  # 4 full buffers of 2, then 1
    assert max_abs_diff(result.model, reference_of(result, small_model, blobs, 3)) <= TOL
    assert result.workers == 3 and result.history[-1]["samples"] == 2 * 96


def test_a_replayed_order_is_followed_and_equals_its_simulation(blobs, small_model, tmp_path):
    order = [2, 2, 2, 1, 0, 1, 0, 1, 0]  # not what threads would do by themselves
    result = fit(small_model, blobs, strategy=f"{STRATEGY[:-1]}, replay={order})", workers=3)
    assert arrival_order(result) == order
    assert max_abs_diff(result.model, reference_of(result, small_model, blobs, 3)) <= TOL
    # the order read back from a history file reproduces the run
    write_jsonl(tmp_path / "history.jsonl", result.history)
    again = fit(small_model, blobs, strategy=FedBuff(every=3, buffer=2, server_lr=0.8, server_momentum=0.5,
                                                     replay=str(tmp_path / "history.jsonl")), workers=3)
    assert max_abs_diff(again.model, result.model) <= TOL
    # the staleness weight made a difference
    flat = fit(small_model, blobs, strategy=f"{STRATEGY[:-1]}, replay={order})".replace("staleness=0.5", "staleness=0"),
               workers=3)
    assert max_abs_diff(flat.model, result.model) > 1e-4


def test_one_worker_with_a_buffer_of_one_and_server_lr_1_is_plain_training(blobs, small_model):
    result = fit(small_model, blobs, strategy="fedbuff(every=3, buffer=1)", workers=1)
    plain = fit(small_model, blobs, strategy="single", workers=1)
    assert max_abs_diff(result.model, plain.model) <= TOL
    assert len(result.history) == 8  # 24 steps, a change every 3, each applied at once


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_processes_run_equals_a_sequential_simulation_of_its_arrival_order(blobs, small_model):
    result = fit(small_model, blobs, strategy=STRATEGY, workers=2, backend="processes")
    assert sorted(arrival_order(result)) == [0] * 4 + [1] * 4  # 12 steps each, a change every 3
    assert max_abs_diff(result.model, reference_of(result, small_model, blobs, 2)) <= TOL


def test_buffered_change_and_staleness_weight():
    changes, stale = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.0])], [0, 3]
    expected = (changes[0] + 0.5 * changes[1]) / 3  # 1/sqrt(1+3) = 0.5, K = 3
    assert torch.allclose(merges.buffered_change(changes, stale, 0.5, size=3), expected)
    assert torch.allclose(merges.buffered_change(changes, stale, 0.0), (changes[0] + changes[1]) / 2)
    assert merges.staleness_weight(0, 0.5) == 1.0 and merges.staleness_weight(8, 1.0) == pytest.approx(1 / 9)
    with pytest.raises(ValueError):
        merges.staleness_weight(-1, 0.5)


def test_thread_messages_name_their_sender_and_keep_their_order():
    group = ThreadGroup(3, timeout=5.0)
    server, a, b = (ThreadComm(group, r) for r in range(3))
    a.send([torch.tensor([1.0]), torch.tensor([10.0, 11.0])], dst=0)
    b.send([torch.tensor([2.0]), torch.tensor([20.0, 21.0])], dst=0)
    a.send([torch.tensor([3.0]), torch.tensor([30.0, 31.0])], dst=0)
    head, body = torch.empty(1), torch.empty(2)
    assert server.recv([head, body], src=2) == 2 and head.item() == 2.0
    assert server.recv([head, body]) == 1 and body.tolist() == [10.0, 11.0]
    assert server.recv([head, body], src=(1, 2)) == 1 and head.item() == 3.0
    assert a.bytes_sent == 2 * 12 and server.bytes_sent == 0
    late = threading.Timer(0.2, lambda: b.send([torch.tensor([5.0]), torch.tensor([0.0, 0.0])], dst=0))
    late.start()
    assert server.recv([head, body]) == 2 and head.item() == 5.0  # waits for a message to come


def test_spec_round_trip():
    strategy = parse("fedbuff(every=4, buffer=3, server_lr=0.5, replay=[0, 1, 1])")
    assert strategy.replay == (0, 1, 1) and parse(strategy.spec()) == strategy
    assert FedBuff().world_size(3) == 4 and FedBuff.servers == 1


@pytest.mark.parametrize("spec, field", [
    ("fedbuff(buffer=0)", "fedbuff.buffer"),
    ("fedbuff(every=0)", "fedbuff.every"),
    ("fedbuff(server_lr=0)", "fedbuff.server_lr"),
    ("fedbuff(server_momentum=1)", "fedbuff.server_momentum"),
    ("fedbuff(staleness=-1)", "fedbuff.staleness"),
    ("fedbuff(replay=[0, x])", "fedbuff.replay"),
    ("fedbuff(replay=[-1])", "fedbuff.replay"),
])
def test_bad_options_name_the_field(spec, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse(spec)


@pytest.mark.parametrize("kwargs, words", [
    ({"strategy": "fedbuff(replay=[0, 5])"}, ["fedbuff.replay", "0..2"]),
    ({"strategy": "fedbuff(every=3, replay=[0, 1, 2])"}, ["fedbuff.replay names worker 0 1 time", "sends 3"]),
    ({"backend": "stacked"}, ["cannot run on backend 'stacked'", "point_to_point"]),
    ({"nan": "skip"}, ["nan='skip'", "fedbuff"]),
    ({"checkpoint_every": 1, "checkpoint_dir": "unused"}, ["checkpoint", "fedbuff"]),
    ({"backend": "processes", "replicas_per_worker": 2}, ["replicas_per_worker=2", "fedbuff"]),
])
def test_settings_fedbuff_cannot_run_are_refused_before_any_worker(blobs, small_model, kwargs, words):
    with pytest.raises(ConfigError) as caught:
        fit(small_model, blobs, **({"strategy": "fedbuff", "workers": 3} | kwargs))
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_fedbuff_is_not_in_the_default_comparison():
    from unison.comparison import default_strategies

    assert "fedbuff" not in default_strategies()


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_a_torchrun_run_replayed_on_threads_gives_its_model(tmp_path):
    """torchrun with 3 processes: the server and 2 workers, through torch.distributed's send and
    recv; its recorded order replayed on threads (which equals the simulation, above)."""
    from safetensors.torch import load_file
    from torchrun_runs import MOONS_RUN
    from torchrun_runs import torchrun_train
    from unison.data import prepare
    from unison.history import read_jsonl
    from unison.models import mlp

    run = MOONS_RUN.replace('strategy = "periodic(every=5)"', 'strategy = "fedbuff(every=5, buffer=2)"')
    done, out = torchrun_train(run, tmp_path, nproc=3)
    history = read_jsonl(out / "history.jsonl")
    order = [a[0] for record in history for a in record["arrivals"]]
    assert sorted(set(order)) == [0, 1]
    data = prepare("moons", seed=0)
    replayed = unison.fit(lambda: mlp(data.features, [16], data.outputs), data,
                          strategy=f"fedbuff(every=5, buffer=2, replay={out / 'history.jsonl'})", workers=2,
                          backend="threads", epochs=2, batch_size=16, lr=0.1, momentum=0.9, progress=False)
    assert arrival_order(replayed) == order
    saved = load_file(out / "model.safetensors")
    for name, tensor in replayed.model.state_dict().items():
        assert (saved[name] - tensor).abs().max() <= TOL, name


def test_a_worker_whose_loss_is_not_finite_stops_the_run_and_nobody_hangs(blobs, small_model):
    from unison.errors import NonFiniteError

    def loss(output, target):  # every worker's first step
        return F.cross_entropy(output, target) * float("nan")

    with pytest.raises(NonFiniteError, match="step 1 is not finite"):
        fit(small_model, blobs, strategy="fedbuff(every=2)", workers=2, timeout=20, loss=loss)


def _p2p_rank(rank, port, results):
    """One rank of a 3-process gloo group: ranks 1 and 2 send two messages each to rank 0,
    which receives them from any rank."""
    from unison.comm import torch_dist

    comm = torch_dist.join(rank, 3, "127.0.0.1", port, timeout=30)
    head, body = torch.empty(1), torch.empty(3)
    if rank == 0:
        got = []
        for _ in range(4):
            sender = comm.recv([head, body], src=(1, 2))
            got.append((sender, head.item(), body.tolist()))
        results.put(got)
    else:
        for k in (1, 2):
            comm.send([torch.tensor([float(k)]), torch.full((3,), 10.0 * rank + k)], dst=0)
    comm.barrier()
    torch_dist.leave()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_torch_dist_messages_from_any_rank_name_their_sender_and_keep_their_order():
    import multiprocessing

    from unison.comm.torch_dist import host_store

    store = host_store(3, 30, "127.0.0.1")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_p2p_rank, args=(r, store.port, results)) for r in range(3)]
    for p in ranks:
        p.start()
    got = results.get(timeout=90)
    for p in ranks:
        p.join(30)
    assert [p.exitcode for p in ranks] == [0, 0, 0]
    for sender in (1, 2):
        mine = [(h, b) for s, h, b in got if s == sender]
        assert mine == [(1.0, [10.0 * sender + 1] * 3), (2.0, [10.0 * sender + 2] * 3)]


def test_torchrun_with_cuda_lacks_messages_from_any_rank(monkeypatch):
    from unison.launch.torchrun import BACKEND

    assert BACKEND.why_not(FedBuff.needs) is None or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "NCCL" in BACKEND.why_not(FedBuff.needs) and BACKEND.why_not(frozenset()) is None


def test_declared_speeds_slow_a_fedbuff_worker_without_changing_what_the_replay_trains(blobs, small_model):
    """speeds= makes worker 1 wait (a simulation); the model is then what the recorded arrival
    order gives, as without speeds: replaying that order without speeds trains the same model."""
    kwargs = dict(strategy="fedbuff(every=2, buffer=1)", workers=2, backend="threads", epochs=2, batch_size=8,
                  lr=0.1, progress=False, val=None)
    slow = unison.fit(small_model, blobs, speeds=[1, 0.05], **kwargs)
    order = [worker for record in slow.history for worker, _, _ in record["arrivals"]]
    assert order.count(0) == order.count(1) >= 3
    assert order[-3:] == [1, 1, 1]  # 20 times slower: worker 0 was done long before
    replayed = unison.fit(small_model, blobs, **(kwargs | {"strategy": f"fedbuff(every=2, buffer=1, replay={order})"}))
    assert max_abs_diff(slow.model, replayed.model) <= 1e-6


@pytest.mark.parametrize("settings, message", [
    ({"balance": "speed", "speeds": [1, 0.5]}, "balance='speed' is not supported with the asynchronous"),
    ({"on_failure": "continue"}, "on_failure='continue' is not supported with the asynchronous"),
    ({"speeds": [1, 1, 0.5]}, r"speeds=\[1.0, 1.0, 0.5\].*one number per training worker: 2"),
])
def test_uneven_worker_options_fedbuff_cannot_honour_are_refused_by_name(blobs, small_model, settings, message):
    with pytest.raises(ConfigError, match=message):
        unison.fit(small_model, blobs, strategy="fedbuff(every=2)", workers=2, backend="threads", progress=False,
                   **settings)
