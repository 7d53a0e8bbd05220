"""companion.export: safetensors round trip, the pickle payload, torch.export and ONNX Runtime
against eager PyTorch."""

import pickle
from pathlib import Path

import pytest
import torch
from factories import tiny_gpt

from companion import export

LENGTHS = (1, 2, 17, 64, 128)


@pytest.fixture(scope="module")
def gpt():
    model = tiny_gpt(vocab_size=11, block_size=128, dtype=torch.float32).eval()
    return model, "abcdefghij "


@pytest.fixture(scope="module")
def program(gpt):
    return export.export_program(gpt[0], max_batch_size=8)


@pytest.fixture(scope="module")
def onnx_path(program, tmp_path_factory):
    return export.export_onnx(program, tmp_path_factory.mktemp("onnx") / "gpt.onnx")


@pytest.fixture(scope="module")
def session(onnx_path):
    return export.onnx_session(onnx_path)


def test_onnx_file_records_no_path_of_the_exporting_machine(onnx_path):
    import onnx

    raw = onnx_path.read_bytes()
    package = Path(export.__file__).resolve().parent
    assert str(package).encode() not in raw and b"export.py" not in raw
    model = onnx.load(str(onnx_path))
    keys = {kv.key for node in model.graph.node for kv in node.metadata_props}
    assert export.STACK_TRACE_KEY not in keys
    assert "namespace" in keys  # what describes the model stays


def test_strip_stack_traces_reaches_subgraphs_and_functions():
    from onnx import TensorProto, helper

    def node(name, *inputs, **attributes):
        n = helper.make_node("Identity" if not attributes else "If", list(inputs), [name],
                             **attributes)
        helper.set_metadata_props(n, {export.STACK_TRACE_KEY: "File /home/x.py", "keep": "1"})
        return n

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    branch = helper.make_graph([node("y", "x")], "branch", [], [out])
    graph = helper.make_graph([node("c", "x"), node("y", "c", then_branch=branch,
                                                    else_branch=branch)],
                              "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [out])
    function = helper.make_function("local", "f", ["x"], ["y"], [node("y", "x")],
                                    [helper.make_opsetid("", 18)])
    model = helper.make_model(graph, functions=[function])
    assert export.strip_stack_traces(model) is model
    nodes = [*model.graph.node, *model.graph.node[1].attribute[0].g.node,
             *model.graph.node[1].attribute[1].g.node, *model.functions[0].node]
    assert len(nodes) == 5
    for n in nodes:
        assert [(kv.key, kv.value) for kv in n.metadata_props] == [("keep", "1")]


def test_safetensors_round_trip_is_exact_and_reties_the_head(gpt, tmp_path):
    model, vocab = gpt
    path = export.save_gpt(model, vocab, tmp_path / "gpt.safetensors")
    loaded, loaded_vocab = export.load_gpt(path)
    assert loaded_vocab == vocab and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    state, ours = model.state_dict(), loaded.state_dict()
    assert state.keys() == ours.keys()
    assert all(torch.equal(state[k], ours[k]) for k in state)
    x = torch.randint(0, 11, (3, 20))
    assert torch.equal(model(x)[0], loaded(x)[0])
    # the file is a JSON header plus raw bytes: no pickle opcodes, nothing to execute
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"config" in raw[8:8 + header]


def test_safetensors_bad_input(gpt, tmp_path):
    model, vocab = gpt
    with pytest.raises(ValueError, match="vocab"):
        export.save_gpt(model, vocab[:-1], tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model"):
        export.save_gpt("model", vocab, tmp_path / "x.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="metadata"):
        export.load_gpt(tmp_path / "plain.safetensors")


def test_pickle_payload_runs_only_without_weights_only(gpt, tmp_path):
    model, _ = gpt
    path = export.write_pickle_with_payload(tmp_path / "bad.pt", model.state_dict(), "ran")
    assert "companion.export._record_payload" in export.pickle_calls(path)
    before = len(export.PAYLOAD_CALLS)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert len(export.PAYLOAD_CALLS) == before
    loaded = torch.load(path, weights_only=False)
    assert export.PAYLOAD_CALLS[before:] == ["ran"] and loaded["note"] == "ran"
    # an honest checkpoint names only torch's rebuild functions
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    assert all(name.startswith(("torch.", "collections.")) for name in
               export.pickle_calls(tmp_path / "ok.pt"))


@pytest.mark.parametrize("length", LENGTHS)
def test_exported_program_equals_eager(gpt, program, length):
    model, _ = gpt
    x = torch.randint(0, 11, (3, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x)[0])


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", (1, 5))
def test_onnx_runtime_matches_eager_in_float32(gpt, session, batch, length):
    model, _ = gpt
    x = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = model(x)[0]
    got = export.onnx_logits(session, x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # float32: different kernels and fusions, same maths; logits are O(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_exported_program_rejects_shapes_outside_its_range(program):
    with pytest.raises(Exception, match=r"Guard failed: idx\.size\(\)\[1\] <= 128"):
        program.module()(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(Exception, match=r"Guard failed: idx\.size\(\)\[0\] <= 8"):
        program.module()(torch.zeros(9, 4, dtype=torch.long))


def test_export_bad_input(gpt):
    with pytest.raises(TypeError, match="model"):
        export.export_program(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_batch_size"):
        export.export_program(gpt[0], max_batch_size=1)
    with pytest.raises(TypeError, match="program"):
        export.export_onnx(gpt[0], "x.onnx")
    with pytest.raises(ValueError, match="threads"):
        export.onnx_session("x.onnx", threads=0)
