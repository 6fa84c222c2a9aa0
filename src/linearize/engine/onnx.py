"""The ONNX Runtime engine: the model's fixed-shape decode step exported once, run with IOBinding.

Quantized linears become ``MatMulNBits`` nodes reading the model's own codes (4 or 8 bits, groups
of 32); fp linears stay ``MatMul``. The exported graph is cached under
``<cache>/engines/<model hash>/`` (the hash covers the weights, the config and the engine's
shapes), so a second run loads it in a second. The state lives in numpy arrays bound to the
session without copies (:class:`~linearize.engine.ring.RingState`); per token the host writes a
few rows into the ring buffers and nothing else moves.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linearize.engine.kernels import cpu_flags_line
from linearize.engine.kernels import library as kernels_library
from linearize.engine.ring import RingRows, RingState
from linearize.engine.step import FixedStep, RowsStep, check_kv_type, fill_rotation
from linearize.engine.tree import (
    TreeStep,
    leave_width,
    leaving_columns,
    tree_controls,
    tree_inputs,
)
from linearize.models.decoder import Decoder, ModelState
from linearize.ops.tree import Tree
from linearize.paths import build_once, cache_dir

logger = logging.getLogger(__name__)

# 7: layers whose α is 0 export without their global part; 8: tree graphs take rings of any
# reach; 9: tree graphs run q/k/v and gate/up as one linear each; 10: the step scores each
# query head against the ring as a one-row product; 11: value rings slot-major, [1, Hkv, C, V];
# 12: MatMulNBits without a zero-point input where its default is meant (a faster kernel);
# 13: the retained cache (in the rings, after the sinks); 15: the rows' step, a graph of its
# own (sequences stepped together; the one-sequence graph unchanged but for its export);
# 16: tree graphs score sinks and the global part on the columns that can use them, and the
# chain graphs (prefill chunks, drafts) rank a retained cache by totals; 17: trees count the
# candidates above each one by a product; 18: tree graphs compute the logits of the nodes asked
# for (``scored``: a prefill chunk's last); 19: the attention's products as MatMul, not Einsum, the
# scale on the queries; 20: the window's exp weights as one Softmax; 21: a 4-bit head's offset
# term groups however many rows a tree scores; 22: the step graphs' 4-bit linears as linearize's
# MatMul4Bit (with kernels); 23: a tree's softmax weights reshaped for any ring length (the
# graphs of 22 took the ring's length at export for a constant), float16 rings; 24:
# MatMul4Bit reads bases (−z·s) for offsets, float16 ones (and scales) on Q4_1's float16 grid;
# 25: int8 rings (kv_type), read by RingAttentionInt8; 26: the step graphs' 8-bit linears (an
# int4 model's head) as linearize's MatMul8Bit; 27: MatMul4Bit's weights in blocks of 8 rows
EXPORT_VERSION = 27
# MatMulNBits' arithmetic (``accuracy_level``): "fp32" multiplies the dequantized weights in fp32
# (the reference's numbers); "int8" quantizes the activations per block and multiplies in
# integers (measured 3x faster for 4-bit weights, 65x for 8-bit ones, on this AVX2 CPU).
ACCURACY = {"fp32": 0, "int8": 4}
# The rings' keys and values for quantized weights in int8 arithmetic (OnnxEngine's kv_type).
QUANTIZED_KV = "float16"
GRAPH = "graph.onnx"
# The suffix of the step graphs' folders with linearize's kernels' nodes (engine.kernels):
# step-kernels, rows-kernels.
KERNELS = "-kernels"
# Positions per block of the engine's RoPE tables (cos, sin, the sinks' positions): a step reads
# its row; a block is rebuilt when the position leaves it, so the tables do not grow with context.
ROPE_BLOCK = 4096
# The prompt chunk of a prefill on the engine (build_engine): a chain graph of 64 nodes reads the
# weights and rings once for 64 tokens. A 1k / 4k prompt of the default int4 model, one thread:
# 2.4-2.7 / 10.6-10.9 s against 3.9-4.6 / 17.9-18.8 s in the reference (docs/results.md,
# "Prefill on the engine").
PREFILL_CHUNK = 64
# onnxruntime's transpose optimizer runs once generic and once per execution provider.
NO_TRANSPOSE_PUSHING = ["TransposeOptimizer", "TransposeOptimizer_CPUExecutionProvider"]
INSTALL = "pip install 'linearize[fast]'  (or: pip install onnxruntime onnx)"


def _require_onnxruntime():
    # (onnx itself is imported by the exports that need it: 0.6 s a process that finds its
    # graphs exported already.)
    try:
        import onnxruntime

        if importlib.util.find_spec("onnx") is None:
            raise ImportError("onnx")
    except ImportError:
        raise RuntimeError(
            f"the onnx engine needs onnxruntime and onnx; install them: {INSTALL}"
        ) from None
    return onnxruntime


def model_hash(model: Decoder, max_context: int | None) -> str:
    """What the exported graph depends on: weights, configs, max context, export version."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    config["attention"] = [
        model.config.attention_config(i).to_dict() for i in range(len(model.layers))
    ]
    quant = None if model.quantization is None else model.quantization.to_dict()
    # Only softmax caches depend on the max context; a linear model's graph serves any length.
    if all(c["kind"] != "softmax" for c in config["attention"]):
        max_context = None
    header = {"config": config, "quant": quant, "max_context": max_context, "v": EXPORT_VERSION}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("medusa."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _rms_norm(g, x, shape, weight, eps):
    """``aten::rms_norm`` (no ONNX symbolic before opset 23) in opset-17 ops."""
    from torch.onnx import symbolic_helper

    eps = symbolic_helper._maybe_get_const(eps, "f")
    eps = 1e-6 if eps is None or not isinstance(eps, float) else eps
    two = g.op("Constant", value_t=torch.tensor(2.0))
    mean = g.op("ReduceMean", g.op("Pow", x, two), axes_i=[-1], keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps))))
    return g.op("Mul", g.op("Div", x, denom), weight)


def export(
    module: nn.Module,
    example: list[torch.Tensor],
    path: Path,
    accuracy_level: int = 0,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """Write ``module``'s graph to ``path`` (``graph.onnx`` + ``graph.onnx.data``) once: a
    folder there already is whole and kept, and a second process exporting the same graph
    waits for the first and uses its file (:func:`~linearize.paths.build_once`). ``module``
    has ``input_names()`` and ``output_names()``; ``dynamic_axes``: the inputs' axes whose
    length may change from run to run (torch.onnx's format). ``accuracy_level`` is
    ``MatMulNBits``' (0: fp32 arithmetic on the dequantized weights, the reference's numbers;
    4: the activations quantized to int8 per block, integer dot products — several times faster
    on CPUs, and the only fast 8-bit path)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 17)
    build_once(path, lambda tmp: _export_into(tmp, module, example, accuracy_level, dynamic_axes))


def optimize(path: Path, disabled: list[str], libraries: list[Path] = ()) -> Path:
    """The folder of ``path``'s graph as onnxruntime optimizes it (every level but the
    ``disabled`` optimizers), written once per graph and machine, as :func:`export` writes:
    sessions load it with the optimizer off. Optimizing a graph takes longer than loading it
    (the 64-node chain graph of the default int4 model: 2.0 s a session, 0.4 s from the
    optimized file), and every process that decodes loads several. The folder's name holds
    what the optimized graph may depend on beyond the graph: onnxruntime's version, the CPU's
    features (the optimizer may pick kernels for them) and the optimizers left out.
    ``libraries``: the custom ops' libraries the graph needs (:mod:`linearize.engine.kernels`)."""
    key = hashlib.sha256(f"{_machine()} {sorted(disabled)}".encode())
    optimized = path / f"optimized-{key.hexdigest()[:12]}"
    if not (optimized / GRAPH).is_file():
        build_once(optimized, lambda tmp: _optimize_into(tmp, path / GRAPH, disabled, libraries))
    return optimized


def _optimize_into(tmp: Path, source: Path, disabled: list[str], libraries) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    for library in libraries:
        options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp / GRAPH)
    config = options.add_session_config_entry
    config("session.optimized_model_external_initializers_file_name", f"{GRAPH}.data")
    config("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # (The session is only made for the file it writes; onnxruntime warns that an optimized
    # graph may be specific to this machine, which the folder's name records.)
    options.log_severity_level = 3
    ort.InferenceSession(
        str(source), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


@functools.cache
def graph_weight_bytes(path: Path) -> int:
    """Bytes of the initializers of the ONNX graph at ``path`` (its external data unread; read
    once per graph: a cached graph's folder never changes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    total = 0
    for init in graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return total


@functools.cache
def _machine() -> str:
    """onnxruntime's version and this CPU's features: what an optimized graph and the time of a
    run depend on beyond the graph (:func:`optimize`, :meth:`OnnxEngine.timing_key`)."""
    import onnxruntime as ort

    return f"{ort.__version__} {_cpu_features()}"


@functools.cache
def _cpu_features() -> str:
    """This CPU's architecture and instruction-set flags (what optimized graphs may depend on)."""
    return f"{platform.machine()} {platform.processor()} {cpu_flags_line()}"


def _export_into(tmp: Path, module, example, accuracy_level, dynamic_axes) -> None:
    # The tracer warns about every constant it records (shapes, the quantized zero points):
    # all of them are constants of this fixed-shape graph by design.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            tuple(example),
            tmp / "raw.onnx",
            input_names=module.input_names(),
            output_names=module.output_names(),
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets={"com.microsoft": 1},
            dynamic_axes=dynamic_axes,
        )
    import onnx

    graph = onnx.load(tmp / "raw.onnx")
    for node in graph.graph.node:
        if node.op_type in ("MatMulNBits", "MatMul4Bit", "MatMul8Bit"):  # (engine.kernels')
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    if accuracy_level == 0:
        _dequantize_8bit(graph)
    onnx.save(graph, tmp / GRAPH, save_as_external_data=True, location=f"{GRAPH}.data")
    for stale in tmp.glob("*"):
        if stale.name not in (GRAPH, f"{GRAPH}.data"):
            stale.unlink()


def _dequantize_8bit(graph) -> None:
    """Replace 8-bit ``MatMulNBits`` nodes by fp32 ``MatMul`` on their dequantized weights.

    With fp32 arithmetic onnxruntime runs 8-bit ``MatMulNBits`` through a slow fallback
    (measured 65x slower than its int8 arithmetic); the dequantized matmul computes the same
    numbers at the bandwidth of an fp32 weight (the 8-bit LM head of an int4 model: 113 MB)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            inits[node.output[0]] = node.attribute[0].t
    gone: set[str] = set()
    for node in list(graph.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"] != 8:
            continue
        codes = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        N, blocks, size = codes.shape
        # No zero-point input: MatMulNBits' default, 128 (quantize.QuantizedLinear's export).
        weight = (codes - 128) * scale.reshape(N, blocks, 1)
        name = f"{node.name}_dequantized"
        graph.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(weight.reshape(N, -1).T), name)
        )
        matmul = helper.make_node("MatMul", [node.input[0], name], list(node.output), node.name)
        graph.graph.node.insert(list(graph.graph.node).index(node), matmul)
        graph.graph.node.remove(node)
        gone.update(node.input[1:])
    # The codes, scales and zero points nothing reads any more (onnxruntime would warn on each).
    used = {name for node in graph.graph.node for name in node.input}
    for init in [i for i in graph.graph.initializer if i.name in gone - used]:
        graph.graph.initializer.remove(init)
    for const in [n for n in graph.graph.node if n.op_type == "Constant"]:
        if const.output[0] in gone - used:
            graph.graph.node.remove(const)


def _step_example(
    model: Decoder, step: FixedStep, state: RingState, rows: bool
) -> list[torch.Tensor]:
    """Inputs of the one-sequence step, or with ``rows``, of the rows' step (``state``'s rows)."""
    D = model.config.hidden_size
    K = model.layers[0].self_attn.config.head_dim
    state.prepare()
    n = state.rows if rows else 1
    rotation = torch.eye(K).expand(n, K, K).contiguous() if rows else torch.eye(K)
    arrays = state.inputs if rows else {**state.inputs, **state.one_row}
    return [torch.zeros(n, 1, D), rotation] + [
        torch.from_numpy(arrays[name]) for name in step.input_names()[2:]
    ]


class OnnxEngine:
    """``engine.prefill(ids) -> logits``, ``engine.step(token) -> logits`` (``[V]`` tensors).

    The prefill runs in the PyTorch reference (chunk form) and hands its state over, or, with
    ``prefill_chunk``, through the chain graphs in chunks of that many tokens (what
    :func:`~linearize.engine.build_engine` makes: :data:`PREFILL_CHUNK`); every decode step
    runs the exported step graph; ``forward_tree`` / ``commit`` verify and append speculative
    candidates (trees up to ``max_tree`` nodes). ``max_context`` bounds softmax layers' caches
    (linear layers' state does not depend on it).

    A decode step reads the filled part of its long rings (a wide window, a softmax cache), not
    their whole capacity: the state holds the first ``reach`` slots of each ring, the context
    rounded up to the next multiple of ``reach_step`` (past it by at most ``reach_step``), and
    grows by ``reach_step`` (a copy) when the context gets there, until the rings are whole; the
    step graph takes rings of any length.
    ``reach_step=0``: always whole rings. A tree grows the reach first when its deepest node
    would pass it.

    ``kv_type``: the element type of the keys and values in the rings that linearize's
    ``RingAttention`` reads (softmax windows and caches; :data:`~linearize.engine.step.KV_TYPES`):
    ``float16`` as llama.cpp's KV cache holds them, half the bytes a long context's step reads;
    ``int8``, codes with a float32 scale per 32 (llama.cpp's ``q8_0``), 56 % of float16's (the
    arithmetic float32 in both). ``None``: :data:`QUANTIZED_KV` for quantized weights with
    ``accuracy="int8"``, else float32 (``fp32`` arithmetic keeps the reference's numbers, as
    do fp32 weights). Without the kernels every ring is float32.
    """

    def __init__(
        self,
        model: Decoder,
        *,
        max_context: int = 4096,
        threads: int | None = None,
        cache: str | os.PathLike | None = None,
        max_tree: int = 64,
        prefill_chunk: int = 0,
        accuracy: str = "int8",
        reach_step: int = 256,
        kernels: bool = True,
        kv_type: str | None = None,
    ) -> None:
        ort = _require_onnxruntime()
        if model.config.architecture != "llama":
            architecture = model.config.architecture
            raise ValueError(f"the onnx engine runs LLaMA-family decoders, not {architecture!r}")
        if model.quantization is not None and not model.quantization.coded:
            raise ValueError(
                "the onnx engine runs fp32, int8 or int4 weights, not bf16: use --engine torch "
                "(bf16 matmuls run on oneDNN there)"
            )
        self.model = model.float().eval()
        self.max_context = max_context
        # linearize's kernels (engine.kernels: RingAttention for the step's softmax windows,
        # MatMul4Bit for its 4-bit linears), where they build here; ``kernels=False``: the
        # graph's own ops (their references).
        self.kernel_library = kernels_library() if kernels else None
        if accuracy not in ACCURACY:
            raise ValueError(f"accuracy={accuracy!r}; allowed: {list(ACCURACY)}")
        if kv_type is None:  # (the class's docstring)
            quantized = accuracy == "int8" and model.quantization is not None
            kv_type = QUANTIZED_KV if quantized else "float32"
        check_kv_type(kv_type)
        kernels_built = self.kernel_library is not None
        self.step_module = FixedStep(self.model, max_context, kernels_built, kv_type)
        self.rows_module = RowsStep(self.step_module)
        self.layouts = self.step_module.layouts
        # The rings' type where the kernels read them (float32 without the kernels or softmax
        # windows; int8 asked for heads not a multiple of 32 wide: float16, Layout.kv_type).
        rounded = [lay.kv_type for lay in self.layouts if lay.kv_type != "float32"]
        self.kv_type = rounded[0] if rounded else "float32"
        if kv_type == "int8" and self.kv_type == "float16":
            logger.info("int8 rings take heads a multiple of 32 wide: float16 rings instead")
        # The arithmetic of tree passes and, unless switched (use_step_arithmetic), of steps.
        self.accuracy = accuracy
        if reach_step < 0:
            raise ValueError(f"reach_step must be >= 0 (0: whole rings), got {reach_step}")
        # Rings longer than the shortest reach grow with the context; the others are whole.
        self.reach_step = reach_step
        self.longest = max((lay.capacity for lay in self.layouts), default=0)
        # The ring slots before the window's tokens beyond the sinks (the retained caches').
        self.retained_slots = max((lay.retained for lay in self.layouts), default=0)
        self.growing = {
            lay.key for lay in self.layouts if reach_step and lay.capacity > 2 * reach_step
        }
        name = model_hash(self.model, max_context)
        growing = f"-reach{reach_step}" if self.growing else ""
        rings = f"-{self.kv_type}kv" if self.kv_type != "float32" else ""
        self._graphs = _cache_root(cache), f"{name}-{{}}{growing}{rings}"
        # Each session's optimized graph folder, by (graph name, accuracy).
        self._folders: dict[tuple[str, str], Path] = {}
        # The steps' sessions, and the tree graphs': their passes alternate with host work (the
        # commit), which threads spinning between passes slow (a 1k prompt in chains of 64 on
        # two threads 2.83-2.85 s spinning, 2.42-2.48 s not; a decode step 9.3 against
        # 11.7 ms: steps keep spinning).
        self.options, self.tree_options = (_options(ort, threads, spin) for spin in (True, False))
        if self.kernel_library is not None:
            self.options.register_custom_ops_library(str(self.kernel_library))
        self.threads = threads
        self.rope = next(
            (layer.self_attn.rope for layer in model.layers if layer.self_attn.rope is not None),
            None,
        )
        # Step sessions by arithmetic; the one steps run now.
        self.steps: dict[tuple[str, bool], object] = {}
        self.session, self.step_accuracy = self._step_session(accuracy), accuracy
        self.max_tree = max_tree
        if not 0 <= prefill_chunk <= max_tree:
            raise ValueError(
                f"prefill_chunk must lie in [0, max_tree={max_tree}], got {prefill_chunk}"
            )
        self.prefill_chunk = prefill_chunk
        # Tree graphs by (size, chain): the chain graphs take only chains (tree.TreeStep).
        self.trees: dict[tuple[int, bool], tuple[object, TreeStep]] = {}
        self.tree_modules: dict[bool, TreeStep] = {}
        # Per layout with sinks at cache positions, an attention that computes where they sit.
        self.sink_layers = {}
        for layer, lay in zip(model.layers, self.layouts, strict=True):
            if lay.cache_sinks:
                self.sink_layers.setdefault(lay.key, layer.self_attn)
        self.rotation_size = model.layers[0].self_attn.config.head_dim
        self._table = None
        # The embedding table, dequantized once: a lookup per step is a row copy.
        self.embedding = model.embed_tokens.weight.detach().float().numpy()
        self.reset()

    def _dynamic_axes(
        self, names: list[str] | None = None, rows: bool = False
    ) -> dict[str, dict[int, str]]:
        """The inputs among ``names`` (default: the step's, and its outputs) whose length may
        change from run to run: a ring's slots, its mask or times, that follow the state's
        reach; a tree's visibility ``visible.j`` (slots, then nodes) of the ``j``-th distinct
        layout; with ``rows``, the step's rows (axis 0 of its inputs and outputs, but a
        layout's ``inwindow`` and ``window_mask``, the same for every row)."""
        keys = sorted(self.growing, key=str)
        distinct = list(dict.fromkeys(lay.key for lay in self.layouts))
        if names is None:
            names = self.step_module.input_names() + self.step_module.output_names()
        axes: dict[str, dict[int, str]] = {}
        for name in names:
            kind, _, index = name.partition(".")
            if rows and kind not in ("inwindow", "window_mask"):
                axes[name] = {0: "rows"}
            if kind == "visible":
                key = distinct[int(index)]
                if key in self.growing:
                    axes[name] = {1: f"visible{keys.index(key)}"}
                continue
            ringed = ("k", "v", "k_scale", "v_scale", "fk", "mask", "times", "score")
            ringed += ("score_out", "inwindow")
            if kind not in (*ringed, "window_mask"):
                continue
            key = self.layouts[int(index)].key
            if key in self.growing:
                axis = {"mask": int(rows), "times": 0, "inwindow": 0, "window_mask": 0}.get(kind, 2)
                # A retained layer's scores: one per slot and the new token's.
                retained = ("score", "score_out", "inwindow", "window_mask")
                slots = "scores" if kind in retained else "slots"
                axes.setdefault(name, {})[axis] = f"{slots}{keys.index(key)}"
        return axes

    def _ring(self, reach: int | None = None, rows: int = 1) -> RingState:
        """An empty state holding ``reach`` slots per ring (``None``: whole rings)."""
        inv_freq = None if self.rope is None else self.rope.inv_freq
        return RingState(self.layouts, reach, inv_freq, rows=rows)

    def _slot(self, pos: int) -> int:
        """The furthest ring slot the token at ``pos`` can take: its position, past the
        retained caches' slots (after the sinks)."""
        return pos + self.retained_slots

    def _reach(self, pos: int) -> int | None:
        """The ring slots a state at position ``pos`` holds (``None``: whole rings)."""
        if not self.growing:
            return None
        # One step ahead: a step at 1k reads 1,024-1,280 slots of a wide ring (two steps ahead:
        # 1,280-1,536; 1.8 % of the step measured in one process).
        reach = (self._slot(pos) // self.reach_step + 1) * self.reach_step
        return None if reach >= self.longest else reach

    def _step_session(self, accuracy: str, rows: bool = False):
        """The step graph's session with ``accuracy`` (built once per engine): for one sequence
        (:class:`~linearize.engine.step.FixedStep`), or with ``rows``, for any number of rows
        (:class:`~linearize.engine.step.RowsStep`, :meth:`step_rows`); each exported on first
        use."""
        key = (accuracy, rows)
        if key not in self.steps:

            def example() -> list[torch.Tensor]:
                # (Rows: two, so that nothing in the graph takes their number for a constant.)
                ring = self._ring(rows=2 if rows else 1)
                return _step_example(self.model, self.step_module, ring, rows)

            axes = self._dynamic_axes(rows=rows)
            name, module = ("rows", self.rows_module) if rows else ("step", self.step_module)
            if self.step_module.kernels:
                name += KERNELS  # a graph of its own
            self.steps[key] = self._session(name, module, example, axes, accuracy)
        return self.steps[key]

    def _session(
        self,
        name: str,
        module: nn.Module,
        example: Callable[[], list[torch.Tensor]],
        dynamic_axes=None,
        accuracy: str | None = None,
    ):
        """``name``'s graph (exported once per model, from the inputs ``example()`` makes; with
        ``accuracy``, default the engine's) as a session."""
        import onnxruntime as ort

        accuracy = accuracy or self.accuracy
        root, folder = self._graphs
        path = root / folder.format(accuracy) / name
        if not (path / GRAPH).is_file():
            logger.info("exporting the %s graph to %s (once per model)", name, path)
            export(module, example(), path, ACCURACY[accuracy], dynamic_axes)
        # The transpose optimizer stays off for the step: it once pushed a transpose of the
        # scores past the softmax (~10x slower broadcasts); with the one-row products
        # (engine.step._local) it gains nothing (15.32 against 15.14 ms a 1k step, the two
        # sessions alternating in one process). The tree graphs gain from it.
        step = name.removesuffix(KERNELS) in ("step", "rows")
        libraries = [self.kernel_library] if name.endswith(KERNELS) else []
        optimized = optimize(path, NO_TRANSPOSE_PUSHING if step else [], libraries)
        self._folders[name, accuracy] = optimized
        return ort.InferenceSession(
            str(optimized / GRAPH),
            self.options if step else self.tree_options,
            providers=["CPUExecutionProvider"],
        )

    def reset(self) -> None:
        self.use_step_arithmetic(None)
        self._use(self._ring(self._reach(0)))

    def use_step_arithmetic(self, accuracy: str | None) -> None:
        """Run plain steps with ``accuracy`` (``None``: the engine's own, which tree passes
        always use) until the next :meth:`reset` or :meth:`prefill`: plain decoding on an
        engine built for exact speculation (fp32) takes the faster int8 arithmetic when the
        planner leaves speculation off. Its step graph is exported once, on first use."""
        accuracy = accuracy or self.accuracy
        if accuracy not in ACCURACY:
            raise ValueError(f"accuracy={accuracy!r}; allowed: {list(ACCURACY)}")
        if accuracy == self.step_accuracy:
            return
        self.session, self.step_accuracy = self._step_session(accuracy), accuracy
        self._use(self.state)

    def _use(self, state: RingState) -> None:
        """Run on ``state`` from now on (its buffers and bindings: :meth:`_bindings`)."""
        self.state = state
        self.bindings = self._bindings(state)

    def _bindings(self, state: RingState) -> list:
        """The step session's I/O bindings of ``state``, one per arrangement of its ping-pong
        buffers (``RingState.swap``), by parity; with the state's own input / output buffers
        (``state.io``: the token's embedding, its rotation, the logits), so that states step
        independently (:meth:`step_on`). Built once per state and session: a state's arrays
        never move, and binding costs ~2.7 ms, a quarter of a step."""
        bindings = state.bindings.get(self.session)
        if bindings is not None:
            return bindings
        state.make_io(*self._io_sizes())
        x, rotation, logits = state.io
        bindings = state.bindings[self.session] = [None, None]
        for _ in range(2):
            binding = self.session.io_binding()
            inputs = {"x": x, "rotation": rotation[0], **state.inputs, **state.one_row}
            for name in self.step_module.input_names():
                _bind(binding.bind_input, name, inputs[name])
            outputs = {"logits": logits, **state.outputs}
            for name in self.step_module.output_names():
                _bind(binding.bind_output, name, outputs[name])
            bindings[state.parity] = binding
            state.swap()
        return bindings

    @property
    def pos(self) -> int:
        return self.state.pos

    def nbytes(self) -> int:
        return self.state.nbytes()

    def weight_bytes(self) -> int:
        """Bytes of the weights one plain step reads: its graph's initializers as the session
        loads them (4-bit codes and their float16 scales, an 8-bit head's codes). The token's
        embedding is one row the host copies (not counted). The model's own bytes (fp32 scales
        and zero points) are more."""
        name = "step" + (KERNELS if self.step_module.kernels else "")
        return graph_weight_bytes(self._folders[name, self.step_accuracy] / GRAPH)

    def read_bytes(self) -> int:
        """Bytes the next plain step reads from memory: :meth:`weight_bytes` and the state's
        filled part (:meth:`RingState.read_bytes`); what a bandwidth bound divides."""
        return self.weight_bytes() + self.state.read_bytes(self._slot(self.pos) + 1)

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Run the prompt, the last token's logits: in chunks of ``prefill_chunk`` tokens
        through the chain graph of that size (a shorter last chunk padded: one graph for every
        prompt, not one more to export and load per length), or, with ``prefill_chunk=0`` or a
        prompt shorter than a chunk, in the PyTorch reference (chunk form) whose state the
        engine takes over."""
        self.use_step_arithmetic(None)
        if self.prefill_chunk and len(ids) >= self.prefill_chunk:
            self._use(self._ring(self._reach(0)))  # forward_tree grows the reach
            for start in range(0, len(ids), self.prefill_chunk):
                piece = list(ids[start : start + self.prefill_chunk])
                chain = Tree.from_parents([-1, *range(len(piece) - 1)])
                # Only the last token's logits: the head is a tenth of a chain's pass.
                last = [len(piece) - 1]
                logits, hidden = self.forward_tree(piece, chain, last, self.prefill_chunk)
                self.commit(list(range(len(piece))))
            self.last_hidden = hidden[-1]
            return logits[-1]
        last, state = self.model.prefill(torch.tensor([ids]))
        self.load_state(state)
        # The last prompt token's final hidden state (what Medusa heads read).
        self.last_hidden = last[0]
        return self.model.lm_head(self.last_hidden)

    def hold(self, state: ModelState) -> RingState:
        """A ring state of its own holding ``state`` (a PyTorch state), to step with
        :meth:`step_on` (a caller decoding several sequences on this one engine keeps one per
        sequence) or to add to rows stepped together (:meth:`rows`)."""
        ring = self._ring(self._reach(state.pos))
        ring.load(state)
        return ring

    @torch.no_grad()
    def step_on(self, ring: RingState, token: int) -> tuple[RingState, torch.Tensor]:
        """Feed ``token`` to ``ring`` (from :meth:`hold`), leaving the engine's own state alone:
        the ring to keep (a larger one once past its reach) and the next token's logits
        ``[V]`` (a view of the ring's buffer: read it before the ring's next step). Rings step
        concurrently from several threads (one session: onnxruntime runs are thread-safe, and
        a ring's buffers, bindings and RoPE tables are its own)."""
        return self._step(ring, token, ring)

    def load_state(self, state: ModelState) -> None:
        reach = self._reach(state.pos)
        if reach != self.state.reach:
            self._use(self._ring(reach))
        self.state.load(state)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; the logits of the next, ``[V]`` (a view of the engine's buffer:
        read it before the next step)."""
        ring, logits = self._step(self.state, token, self)
        if ring is not self.state:
            self._use(ring)
        return logits

    def _step(self, ring: RingState, token: int, owner) -> tuple[RingState, torch.Tensor]:
        """A step of ``ring`` (moved into a larger one past its reach), with the RoPE tables
        kept on ``owner`` (the engine for its own state, a held ring for itself)."""
        if ring.reach is not None and self._slot(ring.pos) >= ring.reach:
            ring = ring.grown(self._reach(ring.pos))
        bindings = self._bindings(ring)
        self._prepare(ring, token, owner)
        self.session.run_with_iobinding(bindings[ring.parity])
        ring.commit()
        return ring, torch.from_numpy(ring.io[2][0])

    def _prepare(self, ring: RingState, token: int, owner) -> None:
        """A step's inputs for ``ring``: the token's embedding and rotation, the sink query's
        rotations, the control tensors (RoPE tables kept on ``owner``)."""
        pos = ring.pos
        x, rotation, _ = ring.io
        x[0, 0] = self.embedding[token]
        if self.rope is not None:
            start, cos, sin, sinks = self._tables(pos, pos, owner)
            i = pos - start
            fill_rotation(rotation[0], cos[i], sin[i])
            for key, positions in sinks.items():
                control = ring.controls[key]
                # Constant once the window is full: rewritten only when it moves (every step
                # until then, at a position inside the block).
                if control.sink_position != positions[i]:
                    control.sink_position = p = int(positions[i])
                    if start <= p < start + len(cos):
                        fill_rotation(control.sink_rotation, cos[p - start], sin[p - start])
                    else:
                        fill_rotation(control.sink_rotation, *self._rope_at(p))
        ring.prepare()

    def _io_sizes(self) -> tuple[int, int, int]:
        """The step's own buffers per row: hidden size, rotation size, vocabulary."""
        config = self.model.config
        return config.hidden_size, self.rotation_size, config.vocab_size

    def rows(self, capacity: int = 4) -> RingRows:
        """Sequences to step together with :meth:`step_rows`, up to ``capacity`` before the
        rows double: ``rows.add(key, engine.hold(state))`` puts one in, ``rows.remove(key)``
        takes it out, ``rows.row(key)`` is its state (e.g. for ``to_state``); :meth:`join`
        puts in a PyTorch state directly."""
        inv_freq = None if self.rope is None else self.rope.inv_freq
        return RingRows(self.layouts, self._reach(0), inv_freq, self._io_sizes(), capacity)

    def prepare_rows(self) -> None:
        """Export (once per model) and load the rows' step graph now, not in the first
        :meth:`step_rows` of two rows or more (a server does it at start)."""
        self._step_session(self.step_accuracy, rows=True)

    def join(self, rows: RingRows, key: object, state: ModelState) -> None:
        """Sequence ``key`` joins ``rows`` with ``state`` (a PyTorch state, after its prompt)."""
        rows.reach_to(self._reach(state.pos))
        rows.load(key, state)

    @torch.no_grad()
    def step_rows(self, rows: RingRows, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to the ``i``-th sequence of ``rows`` (``rows.keys`` order), all in
        one run of the step graph (the weights read once for every row): the next tokens'
        logits ``[len(rows), V]`` (a view of the rows' buffer: read it before their next step).
        Every row equals the same sequence stepped alone (:meth:`step_on`); the rows hold as
        many ring slots as the furthest one needs."""
        n = len(rows)
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} rows")
        if not n:
            return torch.from_numpy(rows.batch.io[2][:0])
        if self.growing:  # (a longer reach is a new batch: its own buffers)
            reaches = [self._reach(state.pos) for state in rows.states[:n]]
            rows.reach_to(None if None in reaches else max(reaches))
        for state, token in zip(rows.states[:n], tokens, strict=True):
            self._prepare(state, int(token), state)
        if n == 1:  # the one-sequence graph (the rows' graph runs one row 3-5 % slower)
            state = rows.states[0]
            self.session.run_with_iobinding(self._bindings(state)[state.parity])
        else:
            session = self._step_session(self.step_accuracy, rows=True)
            session.run_with_iobinding(self._rows_binding(session, rows, n))
        rows.commit()
        return torch.from_numpy(rows.batch.io[2][:n])

    def _rows_binding(self, session, rows: RingRows, n: int):
        """``session``'s binding of the first ``n`` rows of ``rows`` as they are now (built
        once per session, number of rows and parity)."""
        key = (session, n, rows.parity)
        binding = rows.bindings.get(key)
        if binding is not None:
            return binding
        x, rotation, logits = rows.batch.io
        binding = session.io_binding()
        shared = ("inwindow", "window_mask")  # the same for every row
        inputs, outputs = rows.arranged()
        inputs = {"x": x, "rotation": rotation, **inputs}
        for name in self.step_module.input_names():
            array = inputs[name]
            _bind(binding.bind_input, name, array if name.split(".")[0] in shared else array[:n])
        outputs = {"logits": logits, **outputs}
        for name in self.step_module.output_names():
            _bind(binding.bind_output, name, outputs[name][:n])
        rows.bindings[key] = binding
        return binding

    def _tables(
        self, first: int, last: int, owner=None
    ) -> tuple[int, np.ndarray, np.ndarray, dict[tuple, np.ndarray]]:
        """``(start, cos, sin, sinks)``: RoPE's ``cos, sin: [n, K]`` and each sink layout's sink
        positions ``[n]`` for the positions ``start, start + 1, ...``, covering ``first..last``:
        a block of ``ROPE_BLOCK`` positions, rebuilt when a position leaves it (fixed memory at
        any context), kept on ``owner`` (default: the engine)."""
        owner = self if owner is None else owner
        table = owner._table
        if table is None or not table[0] <= first <= last < table[0] + len(table[1]):
            positions = torch.arange(first, max(last + 1, first + ROPE_BLOCK))
            cos, sin = self.rope.cos_sin_at(positions)
            sinks = {
                key: attn._sink_positions(positions).numpy()
                for key, attn in self.sink_layers.items()
            }
            owner._table = table = (first, cos.numpy(), sin.numpy(), sinks)
        return table

    def _rope_at(self, positions: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's ``cos, sin`` at ``positions`` (the sinks' positions: anywhere in the cache)."""
        cos, sin = self.rope.cos_sin_at(torch.as_tensor(positions))
        return cos.numpy(), sin.numpy()

    # --- speculative decoding: the tree step and the commit ------------------------------------

    def _tree(
        self, nodes: int, chain: bool = False, size: int | None = None
    ) -> tuple[object, TreeStep, int]:
        """The graph for a tree of ``nodes`` (``chain``: the chain graph): of ``size`` nodes,
        default the smallest power of 2 that holds them (padding nodes see only themselves)."""
        if nodes > self.max_tree:
            raise ValueError(
                f"a tree of {nodes} nodes is past what the engine's tree graphs take "
                f"({self.max_tree}): use a smaller tree, or build the engine with a larger max_tree"
            )
        if size is None:
            size = 2
            while size < nodes:
                size *= 2
        if (size, chain) not in self.trees:
            # One tree module for every size (it holds the fused q/k/v and gate/up weights).
            if chain not in self.tree_modules:
                self.tree_modules[chain] = TreeStep(
                    self.model, self.max_context, chain, self.kv_type
                )
            module = self.tree_modules[chain]

            def example() -> list[torch.Tensor]:
                chain = Tree.from_parents([-1] * size)
                feeds = self._tree_feeds(module, chain, [0] * size, size)
                return [torch.from_numpy(np.asarray(feeds[n])) for n in module.input_names()]

            axes = self._dynamic_axes(module.input_names())
            axes.update(scored={0: "scored"}, logits={1: "scored"})
            name = f"{'chain' if chain else 'tree'}{size}"
            self.trees[size, chain] = (self._session(name, module, example, axes), module)
        session, module = self.trees[size, chain]
        return session, module, size

    def _tree_feeds(
        self,
        module: TreeStep,
        tree: Tree,
        tokens: list[int],
        size: int,
        scored: list[int] | None = None,
    ) -> dict:
        pos = self.state.pos
        ids = torch.tensor([tokens + [0] * (size - len(tokens))])
        feeds = {"x": self.model.embed_tokens(ids).detach().numpy()}
        depths = np.zeros(size, dtype=np.int64)
        depths[: len(tree)] = tree.depths.numpy()
        K = self.rotation_size
        cos, sin = np.ones((size, K), np.float32), np.zeros((size, K), np.float32)
        if self.rope is not None:
            start, table_cos, table_sin, sinks = self._tables(pos, pos + size - 1)
            index = pos + depths - start
            cos, sin = table_cos[index], table_sin[index]
            for j, key in enumerate(module.sink_keys):
                feeds[f"sink_cos.{j}"], feeds[f"sink_sin.{j}"] = self._rope_at(sinks[key][index])
        feeds.update(cos=cos, sin=sin, pos=np.array(pos, dtype=np.int64))
        feeds["scored"] = np.array(range(len(tree)) if scored is None else scored, dtype=np.int64)
        rings = [self.state.controls[key].times for key in module.keys]
        taps = {lay.conv_taps for lay in module.layouts if lay.conv_taps}
        controls = tree_controls(tree, size, pos, rings, taps)
        feeds.update(t_nodes=controls["t_nodes"])
        feeds.update({k: v for k, v in controls.items() if k.startswith("visible.")})
        for j, key in enumerate(module.retain_keys):
            lay = next(lay for lay in module.layouts if lay.key == key)
            visible = controls[f"visible.{module.keys.index(key)}"]
            times = self.state.controls[key].times
            width = leave_width(lay, size)
            feeds[f"leave.{j}"] = leaving_columns(lay, times, controls["t_nodes"], visible, width)
        for i, lay in enumerate(module.layouts):
            for name in tree_inputs(i, lay):
                kind = name.split(".")[0]
                if kind == "times":
                    feeds[name] = self.state.controls[lay.key].times
                elif kind in ("rtimes", "rscore"):
                    feeds[name] = self.state.retained[lay.key].rows(i)[kind]
                elif kind == "conv_index":
                    feeds[name] = controls[f"conv_index.{lay.conv_taps}"]
                else:
                    feeds[name] = self.state.inputs[name]
        return feeds

    @torch.no_grad()
    def forward_tree(
        self,
        tokens: list[int],
        tree: Tree,
        scored: list[int] | None = None,
        size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify tree nodes on top of the state (left untouched): logits ``[N, V]`` and final
        hidden states ``[N, D]``; :meth:`commit` appends an accepted path. ``scored``: the
        nodes whose logits are computed (``[len(scored), V]``; default every node). ``size``:
        the graph's nodes (``len(tree)`` to :attr:`max_tree`; default the smallest power of 2
        that holds the tree)."""
        if size is not None and not len(tree) <= size <= self.max_tree:
            raise ValueError(f"size={size}: a graph of {len(tree)} to {self.max_tree} nodes")
        # The tree graphs read rings up to the state's reach, as a step does; the reach grows
        # first when the deepest node would pass it (its commit writes there).
        deepest = self.state.pos + int(tree.depths.max())
        if self.state.reach is not None and self._slot(deepest) >= self.state.reach:
            self._use(self.state.grown(self._reach(deepest + 1)))
        if scored is not None and not all(0 <= n < len(tree) for n in scored):
            raise ValueError(f"scored={list(scored)}: nodes of a tree of {len(tree)}")
        # A chain (a prefill chunk, a draft) runs on the chain graph: its retained cache ranks
        # in O(N · E), a tree's in O(N · E²).
        session, module, size = self._tree(len(tree), tree.is_chain, size)
        feeds = self._tree_feeds(module, tree, list(tokens), size, scored)
        # The exporter drops inputs a graph never reads (z without normalisation, say).
        wanted = {i.name for i in session.get_inputs()}
        outputs = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        named = dict(zip(module.output_names(), outputs, strict=True))
        self.nodes = {k: v for k, v in named.items() if k.startswith("node_")}
        N = len(tree)
        return torch.from_numpy(named["logits"][0]), torch.from_numpy(named["hidden"][0, :N])

    def commit(self, path: list[int]) -> None:
        """Append the accepted nodes ``path`` (root→node) of the last :meth:`forward_tree`."""
        self.state.commit_tree([int(p) for p in path], self.nodes)

    def timing_key(self) -> str:
        """What the time of a step or a tree pass here depends on: the graphs (the model, the
        arithmetic), the state's reach, the threads and the machine (onnxruntime's version, the
        CPU's features and cores); speculation's stored timings are keyed by it
        (:mod:`linearize.generation.calibrations`)."""
        machine = hashlib.sha256(_machine().encode()).hexdigest()[:12]
        kernels = " kernels" if self.step_module.kernels else ""
        return (
            f"{self._graphs[1].format(self.accuracy)}{kernels} reach={self.state.reach} "
            f"threads={self.threads} cores={os.cpu_count()} machine={machine}"
        )

    def snapshot(self) -> dict:
        return self.state.snapshot()

    def restore(self, snapshot: dict) -> None:
        if snapshot["reach"] != self.state.reach:
            self._use(self._ring(snapshot["reach"]))
        self.state.restore(snapshot)


def _options(ort, threads: int | None, spinning: bool):
    """A session's options: its graph comes optimized (:func:`optimize`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _bind(bind, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def _cache_root(cache: str | os.PathLike | None) -> Path:
    return cache_dir(cache) / "engines"
