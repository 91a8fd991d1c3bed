"""Dataflow tracing: leaf calls, functional ops, in-place values, shared modules, restored modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from lit_compress.errors import SurgeryError
from lit_compress.surgery.trace import leaf_module_names, trace_dataflow


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        z = F.relu(y + x)
        return self.head(torch.flatten(z, 1))


def test_leaf_calls_and_functional_ops_are_recorded_with_their_values() -> None:
    model = Residual()
    graph = trace_dataflow(model, torch.randn(2, 4, 6, 6))
    names = [n.name for n in graph.nodes]
    assert names == ["conv", "act", "torch.Tensor.add", "torch.nn.functional.relu", "torch.flatten", "head"]
    conv, act, add, _relu, flat, head = graph.nodes
    assert conv.inputs == (graph.inputs[0],) and conv.module_type is nn.Conv2d
    assert not add.is_module and add.module_type is None
    assert add.inputs == (act.outputs[0], graph.inputs[0])
    assert graph.consumers(graph.inputs[0]) == [conv, add]  # the input feeds the conv and the residual add
    assert graph.producer(head.inputs[0]) is flat
    assert graph.outputs == [head.outputs[0]]
    assert graph.shapes[flat.outputs[0]] == (2, 144)
    # ops inside leaf modules (F.conv2d, F.linear) are not recorded
    assert not any(n.endswith(("conv2d", "linear")) for n in names)


def test_inplace_activation_output_is_a_new_value() -> None:
    graph = trace_dataflow(Residual(), torch.randn(1, 4, 6, 6))
    conv, act = graph.calls("conv")[0], graph.calls("act")[0]
    assert act.inputs == conv.outputs
    assert act.outputs[0] != conv.outputs[0]
    assert graph.sole_consumer(conv.outputs[0]) is act
    assert graph.producer(act.outputs[0]) is act


def test_shared_module_appears_as_several_calls() -> None:
    block = BasicBlock(8, 8)
    graph = trace_dataflow(block, torch.randn(1, 8, 8, 8))
    relu_calls = graph.calls("relu")
    assert len(relu_calls) == 2
    # second relu reads the result of the in-place residual add (a function node), not bn2 directly
    producer = graph.producer(relu_calls[1].inputs[0])
    assert producer is not None and producer.name == "torch.Tensor.add_"
    assert graph.producer(producer.inputs[0]).name == "bn2"


def test_many_temporaries_keep_distinct_values() -> None:
    class Loop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(50):
                x = x * 1.0 + 1.0  # temporaries die at once without the tracer's references
            return x

    graph = trace_dataflow(Loop(), torch.randn(3))
    assert len(graph.nodes) == 100
    for prev, node in zip(graph.nodes, graph.nodes[1:]):
        assert node.inputs == prev.outputs
    assert graph.num_values == 101


def test_setitem_creates_a_new_value() -> None:
    class Writes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            y[:, 0] = 0.0
            return y

    graph = trace_dataflow(Writes(), torch.randn(2, 3))
    clone, setitem = graph.nodes
    assert setitem.name == "torch.Tensor.__setitem__"
    assert setitem.inputs == clone.outputs and setitem.outputs != clone.outputs
    assert graph.outputs == list(setitem.outputs)


def test_modes_restored_and_traced_in_eval_without_touching_stats() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[bool] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    trace_dataflow(model, torch.randn(2, 3, 4, 4))
    assert seen == [False]
    assert [m.training for m in model.modules()] == [True, True, True, False]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(not m._forward_pre_hooks for m in model.modules())  # tracer hooks removed


def test_leaf_types_and_default_multihead_attention_leaf() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.attn(x, x, x, need_weights=False)
            return self.fc(h)

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    graph = trace_dataflow(model, torch.randn(1, 3, 4))
    assert [n.name for n in graph.nodes] == ["0.attn", "0.fc", "1"]
    assert graph.nodes[0].module_type is nn.MultiheadAttention
    opaque = trace_dataflow(model, torch.randn(1, 3, 4), leaf_types=[Block])
    assert [n.name for n in opaque.nodes] == ["0", "1"]
    assert set(leaf_module_names(model, [Block]).values()) == {"0", "1"}


def test_sole_consumer_excludes_model_outputs_and_kwargs_inputs_work() -> None:
    class TwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.a(x)
            return h, self.b(h) * scale

    graph = trace_dataflow(TwoOut(), {"x": torch.randn(1, 2), "scale": 2.0})
    h = graph.calls("a")[0].outputs[0]
    assert [c.name for c in graph.consumers(h)] == ["b"]
    assert graph.is_output(h) and graph.sole_consumer(h) is None


def test_parameters_used_functionally_are_labelled_sources() -> None:
    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.pos

    graph = trace_dataflow(Pos(), torch.randn(2, 3))
    add = graph.nodes[0]
    assert [graph.sources.get(v) for v in add.inputs] == ["input", "param:pos"]
    assert graph.producer(add.inputs[1]) is None


def test_failing_forward_raises_surgery_error_and_removes_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(SurgeryError, match=r"Tracing Sequential on `example_inputs` failed: RuntimeError"):
        trace_dataflow(model, torch.randn(2, 5))
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
