"""Split one exported program into a *stage* computed once per value of some inputs and a
*rest* computed per call: the hoisting pass behind interactive use of prompt encoders.

SAM users click many prompts on one image. Everything in the geometry encoder that depends only
on the image features (their layer norm for pooling, and the cross-attention key/value
projections of all three layers, which are ~95% of the model's arithmetic) is the same for
every prompt. ``HoistStage`` finds that subgraph by dependence analysis, not by pattern
matching, and cuts the program in two:

    stage(img_feats, img_pos)                -> the frontier tensors
    rest(frontier..., points, ..., box_mask) -> the original outputs

The cut copies nodes verbatim, so ``rest(*stage(image), *prompt)`` performs exactly the
original's operations on exactly the same values: equivalence is bit-for-bit in PyTorch, and the
property tests check it (and TVM's numbers) like any rewrite.

A node belongs to the stage when it is a pure computation whose inputs are stage inputs,
parameters/constants or stage nodes, and it depends on at least one stage input (parameter-only
nodes are left where they are used; TVM folds them to constants). The frontier is every stage
node with a user outside the stage. Frontier values are materialised, so a cheap view or
broadcast on the frontier costs memory the original never allocated; ``HoistResult.frontier``
lists shapes so a caller can see it.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import fx

from .tvm_backend import TvmFunction


class StageError(ValueError):
    """The requested split does not exist (unknown inputs, nothing to hoist, ...)."""


@dataclasses.dataclass
class StagedPrograms:
    """The two halves and how to call them in place of the original."""

    stage: torch.export.ExportedProgram  # stage inputs -> frontier
    rest: torch.export.ExportedProgram  # frontier + other inputs -> original outputs
    stage_inputs: tuple[int, ...]  # positions of the original's inputs the stage takes
    rest_inputs: tuple[int, ...]  # positions of the original's inputs the rest takes (after the frontier)
    frontier: list[dict]  # name, shape, dtype of every tensor handed from stage to rest
    hoisted_nodes: int  # operator nodes moved into the stage
    rest_nodes: int  # operator nodes left per call

    def split_args(self, args: Sequence[torch.Tensor]) -> tuple[tuple, tuple]:
        return tuple(args[i] for i in self.stage_inputs), tuple(args[i] for i in self.rest_inputs)

    def compose(self, stage_fn, rest_fn) -> StagedFunction:
        """A callable taking the original's arguments: ``rest_fn(*stage_fn(stage args), rest args)``."""
        return StagedFunction(stage_fn, rest_fn, self.stage_inputs, self.rest_inputs)

    def frontier_bytes(self) -> int:
        return sum(f["bytes"] for f in self.frontier)


class StagedFunction:
    """Two compiled stages called like the original program. ``stage(*args)`` alone gives the
    frontier (compute it once per image), ``rest(frontier, *args)`` the outputs from it."""

    def __init__(self, stage_fn, rest_fn, stage_inputs: Sequence[int], rest_inputs: Sequence[int]):
        self.stage_fn, self.rest_fn = stage_fn, rest_fn
        self.stage_inputs, self.rest_inputs = tuple(stage_inputs), tuple(rest_inputs)

    def stage(self, *args) -> tuple:
        """The frontier from the original's full argument list (only the stage's inputs are read)."""
        return tuple(self.stage_fn(*(args[i] for i in self.stage_inputs)))

    def rest(self, frontier: tuple, *args):
        """The outputs from a frontier and the original's full argument list."""
        return self.rest_fn(*frontier, *(args[i] for i in self.rest_inputs))

    def __call__(self, *args):
        return self.rest(self.stage(*args), *args)

    def manifest(self, stage_library: str, rest_library: str) -> dict:
        return {
            "format": 1,
            "stage_library": stage_library,
            "rest_library": rest_library,
            "stage_inputs": list(self.stage_inputs),
            "rest_inputs": list(self.rest_inputs),
        }

    @classmethod
    def load(cls, manifest_path) -> StagedFunction:
        """The two TVM libraries ``python -m surgery apply`` wrote, from its ``.stages.json``."""
        path = Path(manifest_path)
        data = json.loads(path.read_text())
        return cls(
            TvmFunction.load(path.parent / data["stage_library"]),
            TvmFunction.load(path.parent / data["rest_library"]),
            data["stage_inputs"],
            data["rest_inputs"],
        )


class PromptSession:
    """Prompts on one image after another, each answered as soon as a single call could.

    The image stage pays for every later prompt, but on its own it can cost more than a whole
    call of the one-call build (SAM3's geometry encoder on a 2-core EPYC: 34 ms against 12 ms
    for 3 points + 2 boxes, the one-call build reassociating attention around the few prompt
    tokens), so a user who clicks once on an image would wait for work only later clicks use.
    A session answers the first prompt on each image with ``one_call``, then computes the image
    stage in a background thread (with ``background=False``: when a second prompt on the image
    arrives, or on ``prepare``); prompts on that image once it is ready run ``staged.rest`` on it
    alone. Until then they are answered by ``one_call`` too, never by waiting.

    Calls take the original program's full argument list. An image is the same while its
    stage inputs are the same tensor objects, unmodified (``Tensor._version``); anything else is
    a new image. Both builds compute the original's operations (each checked against it), so the
    answers agree within their own tolerances, not bit for bit. A failure of the background
    image stage is raised by the next call."""

    def __init__(self, one_call: Callable, staged: StagedFunction, background: bool = True):
        self.one_call, self.staged, self.background = one_call, staged, background
        self._lock = threading.Lock()
        self._image: tuple = ()  # (tensor, version) of each stage input of the current image
        self._frontier: tuple | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def _key(self, args) -> tuple:
        return tuple((args[i], args[i]._version) for i in self.staged.stage_inputs)

    def _same(self, key) -> bool:
        return len(key) == len(self._image) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(key, self._image, strict=True)
        )

    @property
    def ready(self) -> bool:
        """Whether prompts on the current image run the prompt stage alone."""
        return self._frontier is not None

    def forget(self) -> None:
        """Drop the current image (its image stage, finished or running, is not used)."""
        with self._lock:
            self._image, self._frontier = (), None

    def prepare(self, *args) -> None:
        """Compute the image stage of ``args``' image now, in this thread."""
        key = self._key(args)
        with self._lock:
            if not self._same(key):
                self._image, self._frontier = key, None
        self._finish(key, self.staged.stage(*args))

    def wait(self) -> None:
        """Return once a background image stage has finished."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _finish(self, key, frontier) -> None:
        with self._lock:
            if self._same(key):  # the user may have moved on to another image meanwhile
                self._frontier = frontier

    def _stage_in_background(self, key, args) -> None:
        try:
            self._finish(key, self.staged.stage(*args))
        except BaseException as exc:  # noqa: BLE001 - raised by the next call, in the caller's thread
            self._error = exc

    def __call__(self, *args):
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        key = self._key(args)
        with self._lock:
            new_image = not self._same(key)
            if new_image:
                self._image, self._frontier = key, None
            frontier = self._frontier
        if frontier is None and not new_image and not self.background:
            self.prepare(*args)  # the second prompt on an image: its stage, then the prompt stage
            frontier = self._frontier
        if frontier is not None:
            return self.staged.rest(frontier, *args)
        outputs = self.one_call(*args)
        if new_image and self.background:
            self._worker = threading.Thread(target=self._stage_in_background, args=(key, args), daemon=True)
            self._worker.start()
        return outputs


def _is_pure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    # no in-place or out= arguments, no side effects (asserts stay where they are)
    if schema.is_mutable or "_assert" in str(node.target):
        return False
    return True


def _is_guard(node: fx.Node) -> bool:
    # ExportedProgram.module() checks input shapes in a ``_guards_fn`` submodule; each half is
    # re-exported with its own guards, so the original's are dropped.
    return node.op == "call_module" and str(node.target).startswith("_guards")


def hoist(
    program: torch.export.ExportedProgram, stage_inputs: Sequence[str], example_args: Sequence[torch.Tensor]
) -> StagedPrograms:
    """Split ``program`` so that everything depending only on the user inputs named in
    ``stage_inputs`` (and on parameters) runs in a separate program.

    ``example_args`` are the original's positional inputs, used to re-export both halves.
    """
    module = program.module()  # parameters become attributes (get_attr), user inputs placeholders
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders]
    unknown = [s for s in stage_inputs if s not in names]
    if unknown:
        raise StageError(f"unknown input(s) {unknown}; the program's inputs are {names}")
    if len(placeholders) != len(example_args):
        raise StageError(f"{len(example_args)} example inputs for a program of {len(placeholders)} inputs")
    stage_set = set(stage_inputs)

    # Forward dependence analysis: in_stage[node] is True when node is computable from stage
    # inputs and constants alone; depends[node] when it reads at least one stage input.
    in_stage: dict[fx.Node, bool] = {}
    depends: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            in_stage[node] = depends[node] = node.name in stage_set
        elif node.op == "get_attr":
            in_stage[node], depends[node] = True, False
        elif node.op == "output" or _is_guard(node):
            continue
        else:
            inputs = node.all_input_nodes
            in_stage[node] = _is_pure(node) and all(in_stage[i] for i in inputs)
            depends[node] = any(depends.get(i, False) for i in inputs)
    hoisted = [n for n in graph.nodes if n.op == "call_function" and in_stage[n] and depends[n]]
    hoisted_set = set(hoisted)
    if not hoisted:
        raise StageError(f"no computation depends only on {list(stage_inputs)}")

    def outside_users(node):
        return [u for u in node.users if u not in hoisted_set and not _is_guard(u)]

    # The frontier: stage values (stage inputs themselves included) read outside the stage.
    frontier = [n for n in hoisted if outside_users(n)]
    passthrough = [n for n in placeholders if n.name in stage_set and outside_users(n)]
    frontier = passthrough + frontier
    if any(isinstance(n.meta.get("val"), (tuple, list)) for n in frontier):
        raise StageError("a multi-output node sits on the frontier; hoist its getitem users instead")

    # Stage graph: stage inputs -> frontier.
    stage_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        if node.name in stage_set:
            env[node] = stage_graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
    needed = set(hoisted)  # hoisted nodes and the parameter-only values they read
    work = list(hoisted)
    while work:
        for i in work.pop().all_input_nodes:
            if i.op != "placeholder" and in_stage[i] and i not in needed:
                needed.add(i)
                work.append(i)
    for node in graph.nodes:
        if node in needed:
            env[node] = stage_graph.node_copy(node, lambda n: env[n])
    stage_graph.output(tuple(env[n] for n in frontier))

    # Rest graph: frontier + remaining inputs -> original outputs.
    rest_graph = fx.Graph()
    renv: dict[fx.Node, fx.Node] = {}
    for node in frontier:
        renv[node] = rest_graph.placeholder(f"staged_{node.name}")
        renv[node].meta = dict(node.meta)
    rest_positions = []
    for i, node in enumerate(placeholders):
        if node.name not in stage_set:
            renv[node] = rest_graph.placeholder(node.name)
            renv[node].meta = dict(node.meta)
            rest_positions.append(i)
    for node in graph.nodes:
        if node.op == "placeholder" or node in hoisted_set or _is_guard(node):
            continue
        if node.op == "output":
            rest_graph.node_copy(node, lambda n: renv[n])
        else:
            renv[node] = rest_graph.node_copy(node, lambda n: renv[n])
    rest_graph.eliminate_dead_code()

    stage_positions = [i for i, n in enumerate(placeholders) if n.name in stage_set]
    stage_module = fx.GraphModule(module, stage_graph, "HoistedStage")
    rest_module = fx.GraphModule(module, rest_graph, "RestStage")
    stage_args = tuple(example_args[i] for i in stage_positions)
    with torch.no_grad():
        frontier_values = tuple(stage_module(*stage_args))
    rest_args = frontier_values + tuple(example_args[i] for i in rest_positions)
    stage_program = torch.export.export(stage_module, stage_args)
    rest_program = torch.export.export(rest_module, rest_args)
    described = [
        {
            "name": n.name,
            "shape": list(v.shape),
            "dtype": str(v.dtype).replace("torch.", ""),
            "bytes": v.numel() * v.element_size(),
        }
        for n, v in zip(frontier, frontier_values)
    ]
    return StagedPrograms(
        stage=stage_program,
        rest=rest_program,
        stage_inputs=tuple(stage_positions),
        rest_inputs=tuple(rest_positions),
        frontier=described,
        hoisted_nodes=len(hoisted),
        rest_nodes=sum(1 for n in rest_graph.nodes if n.op == "call_function"),
    )
