"""export/targets/executorch/signature_memo.py: torch's signature lookups memoized while lowering, never stale.

The memo is what makes an `--experts all` export of a 4B MoE finish (12,000 constants: per-node lookups rebuilt a dict
from every spec each time). Wrong answers there would silently mis-wire constants, so these tests hold the memoized
properties to torch's own computation after every kind of change torch and ExecuTorch make to a signature, and a
lowering with the memo to the same program bytes as one without.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn
from torch.export import graph_signature as gs

from pocketllm.export.targets.executorch.signature_memo import memoized_signatures

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ORIGINAL = {name: p for name, p in vars(gs.ExportGraphSignature).items() if isinstance(p, property)}
MEMOIZED = [n for n in ORIGINAL if n not in ("backward_signature", "assertion_dep_token")]


class Stateful(nn.Module):
    """Parameters, a mutated buffer, a constant buffer and a lifted tensor constant: every kind of input spec."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
        self.register_buffer("steps", torch.zeros(1))
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x):
        self.steps.add_(1)
        for lin in self.linears:
            x = torch.relu(lin(x)) * self.scale
        return x + torch.tensor([1.0] * 8) + self.steps


def exported(layers: int = 3):
    return torch.export.export(Stateful(layers).eval(), (torch.randn(2, 8),), strict=False)


def assert_matches_torch(sig) -> None:
    for name in MEMOIZED:
        got, want = getattr(sig, name), ORIGINAL[name].fget(sig)
        assert (dict(got) if hasattr(got, "keys") else got) == (dict(want) if hasattr(want, "keys") else want), name


def test_memoized_properties_follow_every_kind_of_signature_change():
    sig = exported().graph_signature
    with memoized_signatures():
        assert_matches_torch(sig)
        buffer = next(s for s in sig.input_specs if s.kind == gs.InputKind.BUFFER)
        buffer.arg.name = "renamed_placeholder"  # argument renamed in place (torch's placeholder naming)
        assert "renamed_placeholder" in sig.inputs_to_buffers
        assert_matches_torch(sig)
        buffer.target = "renamed_buffer"  # spec target rewritten in place
        assert sig.inputs_to_buffers["renamed_placeholder"] == "renamed_buffer"
        assert_matches_torch(sig)
        sig.input_specs.insert(0, gs.InputSpec(kind=gs.InputKind.BUFFER, arg=gs.TensorArgument(name="lifted_c0"),
                                               target="_lifted_tensor_constant0", persistent=True))  # in-place insert
        assert sig.inputs_to_buffers["lifted_c0"] == "_lifted_tensor_constant0"
        assert_matches_torch(sig)
        sig.input_specs[0].kind = gs.InputKind.PARAMETER  # kind changed in place
        assert "lifted_c0" not in sig.inputs_to_buffers and "lifted_c0" in sig.inputs_to_parameters
        assert_matches_torch(sig)
        sig.input_specs = [s for s in sig.input_specs if s.arg.name != "lifted_c0"]  # a new list
        assert "lifted_c0" not in sig.inputs_to_parameters
        assert_matches_torch(sig)
        sig.output_specs.append(gs.OutputSpec(kind=gs.OutputKind.BUFFER_MUTATION, arg=gs.TensorArgument(name="o9"),
                                              target="renamed_buffer"))
        assert sig.buffers_to_mutate["o9"] == "renamed_buffer"
        assert_matches_torch(sig)
        users = [s for s in sig.input_specs if s.kind == gs.InputKind.USER_INPUT]
        sig.input_specs.append(gs.InputSpec(kind=gs.InputKind.USER_INPUT, arg=gs.TensorArgument(name="y"),
                                            target=None))
        before = sig.user_inputs
        specs = list(sig.input_specs)  # reordered in place, same length, same objects (ExecuTorch's
        sig.input_specs.clear()        # arrange_graph_outputs does this to output_specs)
        sig.input_specs.extend(specs[::-1])
        assert sig.user_inputs == tuple(reversed(before)) and users
        assert_matches_torch(sig)
        i, j = 0, len(sig.input_specs) - 1
        sig.input_specs[i], sig.input_specs[j] = sig.input_specs[j], sig.input_specs[i]  # item assignment
        assert_matches_torch(sig)


def test_a_lookup_is_computed_once_per_state_and_torch_is_restored_after():
    sig = exported().graph_signature
    with memoized_signatures():
        first = sig.inputs_to_buffers
        assert sig.inputs_to_buffers is first  # memoized: the same object while nothing changed
        with memoized_signatures():  # re-entrant: the inner exit leaves the outer memo in place
            assert sig.inputs_to_buffers is first
        assert sig.inputs_to_buffers is first
        sig.input_specs[0].arg.name = sig.input_specs[0].arg.name  # any write invalidates
        assert sig.inputs_to_buffers is not first
    for name, prop in ORIGINAL.items():
        assert vars(gs.ExportGraphSignature)[name] is prop
    for cls in (gs.ExportGraphSignature, gs.InputSpec, gs.OutputSpec, gs.TensorArgument):
        assert "__setattr__" not in vars(cls)
    assert sig.inputs_to_buffers is not sig.inputs_to_buffers  # torch's own again: rebuilt per access


@pytest.mark.parametrize("xnnpack", [False, True])
def test_lowering_with_the_memo_writes_the_same_program(xnnpack):
    from executorch.exir import to_edge_transform_and_lower

    def program(memo: bool) -> bytes:
        torch.manual_seed(0)
        with memoized_signatures() if memo else contextlib.nullcontext():
            ep = exported(layers=12)
            partitioner = []
            if xnnpack:
                from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
                partitioner = [XnnpackPartitioner()]
            return to_edge_transform_and_lower(ep, partitioner=partitioner).to_executorch().buffer

    assert program(memo=True) == program(memo=False)
