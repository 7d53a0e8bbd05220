"""Getting a trained GPT out of Python: safetensors, ``torch.export`` and ONNX (book: chapter 11).

Three ways to ship :class:`~companion.transformer.GPT`, each checked against eager PyTorch:

* **Weights as data.** :func:`save_gpt` / :func:`load_gpt` write and read a ``.safetensors``
  file: a JSON header (names, dtypes, shapes, offsets; here also the config and the
  vocabulary) followed by raw tensor bytes. Loading it parses numbers, never code. A
  pickled checkpoint (``torch.save``) is a program for Python's unpickler: loaded with
  ``torch.load(weights_only=False)`` it can call any importable function.
  :func:`write_pickle_with_payload` builds such a file whose payload is harmless (it
  appends to :data:`PAYLOAD_CALLS`), so the book can show the difference safely.
* **A graph.** :func:`export_program` traces :class:`ExportableGPT` with ``torch.export``
  into an ``ExportedProgram`` (ATen operators only, no Python) with a dynamic batch
  size and sequence length.
* **Another runtime.** :func:`export_onnx` converts that program to ONNX and
  :func:`onnx_session` opens it in ONNX Runtime, a C++ engine with no PyTorch inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from companion._optional import require
from companion._validate import check_int, check_type
from companion.transformer import GPT, GPTConfig

#: What the harmless payload of :func:`write_pickle_with_payload` has done: one entry per run.
PAYLOAD_CALLS: list[str] = []


# --------------------------------------------------------------------------- safetensors


def save_gpt(model: GPT, vocab: str, path: str | Path) -> Path:
    """Write ``model``'s weights (float32, CPU), config and ``vocab`` to a ``.safetensors`` file.

    The tied ``lm_head.weight`` is stored once (``safetensors.torch.save_model`` drops
    the alias and :func:`load_gpt` re-ties it).
    """
    save_model = require("safetensors.torch").save_model

    check_type("model", model, GPT)
    check_type("vocab", vocab, str)
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocab must have vocab_size={model.config.vocab_size} characters, "
                         f"got {len(vocab)}")
    path = Path(path)
    cpu = GPT(model.config)
    cpu.load_state_dict({k: v.detach().to("cpu", torch.float32)
                         for k, v in model.state_dict().items()})
    metadata = {"config": json.dumps(dataclasses.asdict(model.config)), "vocab": vocab}
    save_model(cpu, str(path), metadata=metadata)
    return path


def load_gpt(path: str | Path, device=None) -> tuple[GPT, str]:
    """Read a file written by :func:`save_gpt`: ``(model in eval mode, vocab)``."""
    safe_open = require("safetensors").safe_open
    load_model = require("safetensors.torch").load_model

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if not metadata or "config" not in metadata or "vocab" not in metadata:
        raise ValueError(f"{path} has no GPT config/vocab metadata (write it with save_gpt)")
    model = GPT(GPTConfig(**json.loads(metadata["config"])))
    load_model(model, str(path))  # strict: every tensor present, shapes checked
    return model.to(device if device is not None else "cpu").eval(), metadata["vocab"]


def _record_payload(message: str) -> str:
    PAYLOAD_CALLS.append(message)
    return message


class _Payload:
    """An object whose pickle says "call ``_record_payload(message)``" when it is loaded."""

    def __init__(self, message: str):
        self.message = message

    def __reduce__(self):
        return _record_payload, (self.message,)


def write_pickle_with_payload(path: str | Path, state_dict: dict,
                              message: str = "code ran while loading") -> Path:
    """``torch.save`` a checkpoint that carries ``state_dict`` *and* a function call.

    Loading the file with ``torch.load(path, weights_only=False)`` calls
    ``_record_payload(message)`` (it appends ``message`` to :data:`PAYLOAD_CALLS`); a real
    attacker would name ``os.system`` instead. ``weights_only=True`` refuses the file
    with ``pickle.UnpicklingError``.
    """
    check_type("state_dict", state_dict, dict)
    path = Path(path)
    torch.save({"state_dict": state_dict, "note": _Payload(message)}, path)
    return path


def pickle_calls(path: str | Path) -> list[str]:
    """The callables a pickle file asks the unpickler to import, read without running it.

    ``torch.save`` writes a zip archive whose ``data.pkl`` is the pickle program; the
    ``GLOBAL``/``STACK_GLOBAL`` opcodes name the functions and classes it will import.
    """
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        program = archive.read(name)
    names, strings = [], []
    for opcode, arg, _ in pickletools.genops(program):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif opcode.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]))
        elif opcode.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
    return names


# --------------------------------------------------------------------------- torch.export


class ExportableGPT(nn.Module):
    """``idx (B, T) -> logits (B, T, V)`` of a :class:`~companion.transformer.GPT`, traceable.

    The same layers as ``GPT.forward`` without its input checks, whose data-dependent
    branches (``if (idx >= vocab_size).any()``) ``torch.export`` cannot put in a graph;
    whoever feeds the exported graph checks ids and lengths first (the server does).
    """

    def __init__(self, model: GPT):
        super().__init__()
        check_type("model", model, GPT)
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        m = self.model
        positions = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = m.token_embedding(idx) + m.position_embedding(positions)  # (B, T, C)
        for block in m.blocks:
            x = block(x)
        return m.lm_head(m.final_norm(x))  # (B, T, V)


def _dynamic_shapes(model: GPT, max_batch_size: int) -> dict:
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    length = torch.export.Dim("length", min=1, max=model.config.block_size)
    return {"idx": {0: batch, 1: length}}


def export_program(model: GPT, max_batch_size: int = 64) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ExportableGPT` (eval mode) with dynamic batch and length.

    Batch sizes ``1 .. max_batch_size`` and lengths ``1 .. block_size`` are accepted by
    the program; it is traced once, on a ``(2, min(16, block_size))`` example.
    """
    check_type("model", model, GPT)
    check_int("max_batch_size", max_batch_size, low=2)
    wrapper = ExportableGPT(model).eval()
    device = model.token_embedding.weight.device
    example = torch.zeros(2, min(16, model.config.block_size), dtype=torch.long, device=device)
    return torch.export.export(wrapper, (example,),
                               dynamic_shapes=_dynamic_shapes(model, max_batch_size))


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """Silence two messages of torch 2.13's ONNX exporter that concern other packages:
    torchvision's operators are skipped when it is not installed, and a deprecation
    inside torch's own pytree code. Nothing else is filtered."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Convert an :func:`export_program` result to an ONNX file (weights inside) and check it.

    The input is named ``idx`` (int64, ``(batch, length)``), the output ``logits``.
    The exporter records, on every node, the Python stack that created it -- file paths
    of the machine that exported; they are dropped (:func:`strip_stack_traces`), so the
    same model gives the same file wherever it is exported from.
    """
    onnx = require("onnx")

    check_type("program", program, torch.export.ExportedProgram)
    path = Path(path)
    with _quiet_onnx_exporter():
        onnx_program = torch.onnx.export(program, dynamo=True, external_data=False,
                                         output_names=["logits"], verbose=False)
    model = strip_stack_traces(onnx_program.model_proto)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


#: The node metadata key under which the exporter stores a node's Python stack trace.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model):
    """Remove :data:`STACK_TRACE_KEY` from every node of an ``onnx.ModelProto`` (its graph,
    subgraphs and functions), in place; returns ``model``. The other metadata -- module
    names, the FX node -- describe the model, not the machine, and stay."""

    def strip_graph(graph):
        for node in graph.node:
            strip_node(node)

    def strip_node(node):
        kept = [kv for kv in node.metadata_props if kv.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                strip_graph(attribute.g)
            for graph in attribute.graphs:
                strip_graph(graph)

    strip_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            strip_node(node)
    return model


def onnx_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime ``InferenceSession`` on the CPU with ``threads`` intra-op threads.

    ``session.run(None, {"idx": ids_int64_numpy})[0]`` returns the logits as NumPy.
    """
    ort = require("onnxruntime")

    check_int("threads", threads, low=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, idx: torch.Tensor) -> torch.Tensor:
    """Run ``session`` on ids ``(B, T)`` and return the logits as a float32 CPU tensor."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        raise TypeError("idx must be a (batch, length) torch.long tensor")
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: idx.cpu().numpy()})[0])


__all__ = ["PAYLOAD_CALLS", "save_gpt", "load_gpt", "write_pickle_with_payload", "pickle_calls",
           "ExportableGPT", "export_program", "export_onnx", "STACK_TRACE_KEY",
           "strip_stack_traces", "onnx_session", "onnx_logits"]
