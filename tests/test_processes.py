"""The processes backend: same results as threads and as the sequential definitions; failures
are reported, never hung on."""

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import unison
from unison.errors import WorkerError
from unison.strategies import Periodic

from reference import large_batch_sgd, max_abs_diff
from toy_models import CountsThreads, DiesOnRank1

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]


def fit(model, data, **kwargs):
    kwargs = {"backend": "processes", "epochs": 2, "batch_size": 8, "lr": 0.1, "progress": False} | kwargs
    return unison.fit(model, data, **kwargs)


@pytest.mark.parametrize("workers", [2, 4])
def test_sync_equals_large_batch_sgd(blobs, small_model, workers):
    x, y = blobs
    result = fit(small_model, blobs, strategy="sync", workers=workers, momentum=0.9)
    expected = large_batch_sgd(small_model, x, y, world_size=workers, batch_size=8, epochs=2, lr=0.1,
                               momentum=0.9)
    assert max_abs_diff(result.model, expected) <= 1e-5


def test_processes_and_threads_give_the_same_model(blobs):
    torch.manual_seed(0)
    model = unison.models.mlp(8, [16], 3, batchnorm=True)
    kwargs = dict(strategy=Periodic(every=3, optimizer_state="average"), workers=2, momentum=0.9,
                  val=(blobs[0][:16], blobs[1][:16]))
    in_processes = fit(model, blobs, **kwargs)
    in_threads = fit(model, blobs, backend="threads", **kwargs)
    assert max_abs_diff(in_processes.model, in_threads.model) <= 1e-5
    assert [r["step"] for r in in_processes.history] == [r["step"] for r in in_threads.history]
    for a, b in zip(in_processes.history, in_threads.history):
        assert a["val_acc"] == b["val_acc"] and a["comm_bytes"] == b["comm_bytes"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.parametrize("how, cause", [("sigkill", "SIGKILL"), ("exit", "code 3"),
                                        ("raise", "RuntimeError: boom"), ("odd", "OddError: 7: bad batch")])
def test_a_dying_worker_stops_the_run_with_its_rank_and_cause(blobs, how, cause):
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        fit(DiesOnRank1(how), blobs, strategy="sync", workers=2, epochs=3)
    assert time.monotonic() - started < 30
    assert info.value.rank == 1
    assert "worker 1" in str(info.value) and cause in str(info.value)
    if how in ("raise", "odd"):
        assert "Traceback" in info.value.cause and "forward" in info.value.cause
    for child in __import__("multiprocessing").active_children():  # nobody left behind
        assert not child.name.startswith("unison-worker"), child


def test_the_failing_worker_is_blamed_even_when_the_launcher_wakes_late(blobs, monkeypatch):
    """Its peer fails too ("connection closed"); with both reports waiting, the cause wins."""
    import unison.launch.processes as processes

    real_wait = processes.wait

    def late_wait(objects, *args, **kwargs):
        real_wait(objects, *args, **kwargs)
        time.sleep(1.0)  # as on a loaded machine: by now the peer has failed as well
        return real_wait(objects, *args, **kwargs)

    monkeypatch.setattr(processes, "wait", late_wait)
    with pytest.raises(WorkerError) as info:
        fit(DiesOnRank1("raise"), blobs, strategy="sync", workers=2, epochs=3)
    assert info.value.rank == 1 and "boom" in str(info.value)


def test_workers_split_the_cores(blobs):
    workers = 2
    expected = max(1, unison.launch.cpu_cores() // workers)
    result = fit(CountsThreads(expected), blobs, strategy="periodic", workers=workers, epochs=1)
    assert result.history  # a worker with the wrong thread count would have raised


# A program that defines its own model class in __main__, with no `if __name__ == "__main__":`
# guard: workers must not re-run it (it would train again in every worker) nor need to import it.
MAIN_PROGRAM = """
import torch, unison
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(4, 2)
    def forward(self, x):
        return self.l(x)
def loss(out, y):  # a loss from __main__ too
    return nn.functional.cross_entropy(out, y)
torch.manual_seed(0)
x = torch.randn(256, 4); y = (x[:, 0] > 0).long()
print("training")
result = unison.fit(Net(), (x, y), val=(x, y), workers=2, backend="processes", progress=False,
                    epochs=5, lr=0.5, batch_size=16, loss=loss)
print("val_acc", result.final["val_acc"], "val_loss", result.final["val_loss"])
"""


def _trained(done):
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert lines.count("training") == 1, done.stdout  # the program ran once: no worker re-ran it
    words = next(line for line in lines if line.startswith("val_acc")).split()
    return float(words[1]), float(words[3])


def test_a_script_without_a_main_guard_trains_its_own_model_class_on_processes(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(MAIN_PROGRAM)
    acc, loss = _trained(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60))
    assert acc >= 0.95 and loss < 0.3


def test_python_c_and_a_program_read_from_stdin_train_on_processes():
    as_command = _trained(subprocess.run([sys.executable, "-c", MAIN_PROGRAM], capture_output=True, text=True,
                                         timeout=60))
    from_stdin = _trained(subprocess.run([sys.executable, "-"], input=MAIN_PROGRAM, capture_output=True,
                                         text=True, timeout=60))
    assert as_command[0] >= 0.95 and as_command[1] < 0.3
    assert from_stdin == as_command  # the same program, seed and data: the same result


def test_a_model_class_defined_in_a_function_travels_by_value(blobs):
    class Local(nn.Module):  # not importable by name: cloudpickle sends the class itself
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    model = Local()
    in_processes = fit(model, blobs, strategy="sync", workers=2)
    in_threads = fit(model, blobs, strategy="sync", workers=2, backend="threads")
    assert max_abs_diff(in_processes.model, in_threads.model) <= 1e-5


class CopiesButDoesNotPickle:
    """As a handle to a resource of this process: copyable here, never sent elsewhere."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("cannot pickle a handle of this process")


def test_unpicklable_model_is_refused_before_training(blobs):
    model = unison.models.mlp(8, [16], 3)
    model.handle = CopiesButDoesNotPickle()

    with pytest.raises(unison.ConfigError, match="backend='threads'"):
        fit(model, blobs, strategy="sync", workers=2)


@pytest.mark.slow
def test_digits_periodic_every_epoch_4_workers_reaches_93_percent():
    result = unison.fit(lambda: unison.models.mlp(64, [64], 10), "digits",
                        strategy=Periodic(every="epoch"), workers=4, backend="processes",
                        epochs=60, batch_size=16, lr=0.05, momentum=0.9, progress=False)
    assert result.final["val_acc"] >= 0.93, result.summary()


PRESTART_SCRIPT = """
import os
import torch
import unison
from unison.startup import forkserver_pid
x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
kwargs = dict(val=None, epochs=1, batch_size=8, progress=False, backend="processes")
unison.fit(lambda: unison.models.mlp(4, [8], 2), (x, y), strategy="single", **kwargs)
print(forkserver_pid())  # one worker trains here: no forkserver
unison.prestart()
started = forkserver_pid()
os.kill(started, 0)  # it is running
unison.fit(lambda: unison.models.mlp(4, [8], 2), (x, y), strategy="periodic", workers=2, **kwargs)
print(started == forkserver_pid())  # fit's workers came from it
"""


def test_prestart_starts_the_forkserver_that_fit_then_uses_and_one_worker_needs_none():
    env = os.environ | {"UNISON_PRESTART": "0"}  # opted out of the forkserver at import time
    done = subprocess.run([sys.executable, "-c", PRESTART_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["None", "True"]


IMPORT_SCRIPT = """
import sys, time
import torch
import unison
from unison import startup
print("torch._dynamo" in sys.modules, "unison.api" in sys.modules, startup.forkserver_pid() is not None)
"""


@pytest.mark.parametrize("env, forkserver", [({}, True), ({"UNISON_PRESTART": "0"}, False),
                                             ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0"}, False)])
def test_import_unison_is_lazy_and_starts_the_forkserver_unless_opted_out_or_under_torchrun(env, forkserver):
    environment = {k: v for k, v in os.environ.items() if k not in ("UNISON_PRESTART", "TORCHELASTIC_RUN_ID")}
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, timeout=60,
                          env=environment | env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False", str(forkserver)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_users_own_child_processes_may_import_unison(tmp_path, method):
    """A child of the user's own multiprocessing imports unison while it unpickles its target,
    before multiprocessing calls it a child: importing unison must not start a forkserver there
    (multiprocessing refuses to start processes during a child's bootstrapping)."""
    (tmp_path / "child_work.py").write_text("import unison\n\ndef work(queue):\n"
                                            "    queue.put(unison.fit.__name__)\n")
    (tmp_path / "main.py").write_text(
        "import multiprocessing\nimport child_work\n\n"
        "if __name__ == '__main__':\n"
        f"    context = multiprocessing.get_context({method!r})\n"
        "    queue = context.Queue()\n"
        "    child = context.Process(target=child_work.work, args=(queue,))\n"
        "    child.start()\n"
        "    print('child said', queue.get(timeout=60))\n"
        "    child.join(timeout=60)\n"
        "    print('exit code', child.exitcode)\n")
    env = {k: v for k, v in os.environ.items() if k != "UNISON_PRESTART"}
    done = subprocess.run([sys.executable, "main.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["child said fit", "exit code 0"], done.stderr[-2000:]
    assert "bootstrapping" not in done.stderr


ROBUST_SCRIPT = """
import os, threading, sys
import torch
x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

def fit_twice():
    from unison import fit, models
    for _ in range(2):
        fit(lambda: models.mlp(4, [8], 2), (x, y), val=None, workers=2, backend="processes", epochs=1,
            batch_size=8, progress=False, loss=ReadsEnv())

class ReadsEnv(torch.nn.Module):  # a loss that reports the worker's environment
    def forward(self, out, target):
        import torch.distributed as dist
        if dist.is_initialized() and not os.path.exists(sys.argv[1] + f".{dist.get_rank()}"):
            with open(sys.argv[1] + f".{dist.get_rank()}", "w") as f:
                f.write(os.environ.get("SET_AFTER_IMPORT", "missing"))
        return torch.nn.functional.cross_entropy(out, target)

importer = threading.Thread(target=lambda: __import__("unison"))  # a thread that ends at once
importer.start(); importer.join()
import multiprocessing, time
from unison import startup
time.sleep(2)                                # the forkserver outlives the thread that started it
print("forkserver alive", startup.forkserver_pid() is not None and os.waitpid(startup.forkserver_pid(), os.WNOHANG) == (0, 0))
os.environ["SET_AFTER_IMPORT"] = "seen"      # set after import unison: the workers must see it
pid = os.fork()
if pid == 0:                                 # a forked child (gunicorn, Celery) trains on its own
    fit_twice()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("forked child", os.waitstatus_to_exitcode(status))
fit_twice()
print("parent", open(sys.argv[1] + ".0").read(), open(sys.argv[1] + ".1").read())
ctx = multiprocessing.get_context("forkserver")   # the user's own forkserver: not unison's
print("user forkserver preloads unison's", "torch" in getattr(__import__("multiprocessing.forkserver").forkserver._forkserver, "_preload_modules", []))
"""


@pytest.mark.multiprocess
def test_the_forkserver_survives_its_importing_thread_forks_and_late_environment_changes(tmp_path):
    done = subprocess.run([sys.executable, "-c", ROBUST_SCRIPT, str(tmp_path / "env")], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "UNISON_PRESTART"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["forkserver alive True", "forked child 0", "parent seen seen",
                                        "user forkserver preloads unison's False"], done.stderr[-3000:]
