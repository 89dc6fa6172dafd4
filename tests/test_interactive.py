"""A notebook: a model class defined in a Jupyter kernel's cell trains on backend "processes"
(its workers never import the kernel's __main__; the class travels by value)."""

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

CELLS = [
    """
import torch, unison
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)
    def forward(self, x):
        return self.l(x)
""",
    """
torch.manual_seed(0)
x = torch.randn(256, 4); y = (x[:, 0] > 0).long()
result = unison.fit(Net(), (x, y), val=(x, y), workers=2, backend="processes", progress=False,
                    epochs=5, lr=0.5, batch_size=16)
print("val_acc", result.final["val_acc"])
""",
    """
again = unison.fit(Net(), (x, y), val=(x, y), workers=2, backend="processes", progress=False,
                   epochs=5, lr=0.5, batch_size=16, seed=1)
print("val_acc", again.final["val_acc"])
""",
]


def run_cell(client, code: str) -> str:
    out: list[str] = []

    def collect(message):
        kind, content = message["header"]["msg_type"], message["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            out.append("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, timeout=60, output_hook=collect)
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


def test_a_model_class_defined_in_a_notebook_cell_trains_on_processes():
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        outputs = [run_cell(client, cell) for cell in CELLS]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    accuracies = [float(out.split("val_acc")[1].split()[0]) for out in outputs[1:]]
    assert all(acc >= 0.95 for acc in accuracies), outputs
