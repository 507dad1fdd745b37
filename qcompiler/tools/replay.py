"""Decode steps that call the compiled graph directly, without Dynamo's frame entry.

Every call of a ``torch.compile``-d forward goes through Dynamo: it evaluates the guards, fetches the
graph's inputs (a SmolLM2 decode graph has some 370: the parameters, the KV cache's tensors, the step's
ids and positions) and builds the output from the graph's. On a decode step of a small model that is
about 0.7 ms of 10 (SmolLM2-135M, ``w4a16-rtn``, an Ice Lake Xeon with 2 threads).

:class:`Recorder` watches the graph calls of two consecutive decode steps on the same KV cache. Where
each step ran exactly one graph and both steps fed it the same way -- every graph input either one of
the step's keyword tensors (by name) or the same tensor object both times (a parameter, a cache tensor)
-- later steps call that graph directly: :meth:`Replay.run` refills the step's tensors into the
recorded inputs and rebuilds the model's output. It first checks what Dynamo's guards would: the same
keyword names, each tensor's type, shape, stride, dtype and device, the other keywords equal, the same
cache object, grad and inference mode as recorded. Anything else (another cache, batch size, a graph
break, a recompile) goes through Dynamo as before. A replay passes the very parameter tensors the
recorded calls passed, and those calls checked that they are the ones the graph was quantized from and
unchanged since (``backend._for_these_weights``); the replayed steps skip that check (0.3 ms a step), so
a parameter changed in place between two steps of one ``generate()`` goes unnoticed until the next one.
"""

from __future__ import annotations

import weakref

import torch


class Recorder:
    """Wraps a Dynamo backend's compiled graphs so that a :class:`Replay` can be taken from a step."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.__name__ = getattr(backend, "__name__", str(backend))
        self.calls: list | None = None  # while recording: (graph, inputs, outputs) per graph call

    def __call__(self, gm, example_inputs, **kwargs):
        backend = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        compiled = backend(gm, example_inputs, **kwargs)
        # a replay holds the very parameters this call was checked with: it may skip qcompiler's check
        unchecked = getattr(compiled, "unchecked", compiled)

        def graph(*inputs):
            outputs = compiled(*inputs)
            if self.calls is not None:
                self.calls.append((unchecked, inputs, outputs))
            return outputs

        return graph

    def record(self, call, kwargs: dict):
        """``call(**kwargs)`` (through Dynamo), and a :class:`Replay` of it or None where it can not be replayed."""
        self.calls = []
        try:
            result = call(**kwargs)
            calls = self.calls
        finally:
            self.calls = None
        return result, (Replay.of(calls[0], kwargs, result) if len(calls) == 1 else None)


_PLAIN = (type(None), bool, int, float, str)


def input_spec(value):
    """What a replay compares of one keyword input: a plain tensor's layout (type, shape, stride, dtype, device,
    requires_grad), or another value's type and value."""
    if type(value) is torch.Tensor:
        return ("tensor", value.shape, value.stride(), value.dtype, value.device, value.requires_grad)
    return ("value", type(value), value)


class Replay:
    """One recorded graph call of a decode step, to be called again with another step's keyword tensors."""

    def __init__(self, graph, inputs, named, specs, objects, result_type, fields, modes) -> None:
        self.graph, self.named, self.specs, self.modes = graph, named, specs, modes
        # the graph's inputs as recorded (the fixed ones held until the cache object is gone: then the
        # replay can not be used again and must not keep the cache's tensors alive)
        self.inputs: list | None = list(inputs)
        self.objects = {name: weakref.ref(obj, self._drop) for name, obj in objects.items()}
        self.names = frozenset(specs) | frozenset(objects)
        self.result_type, self.fields = result_type, fields

    def _drop(self, _ref) -> None:
        self.inputs = None

    @classmethod
    def of(cls, call, kwargs: dict, result):
        """The replay of ``call`` (graph, inputs, outputs), or None where its inputs or the result are not
        the step's keyword tensors, fixed tensors and the graph's outputs."""
        graph, inputs, outputs = call
        specs, objects = {}, {}
        for name, value in kwargs.items():
            if type(value) is torch.Tensor or isinstance(value, _PLAIN):
                specs[name] = input_spec(value)
            elif isinstance(value, torch.Tensor):
                return None  # a tensor subclass: its guards are not ours to repeat
            else:
                objects[name] = value  # the cache: the same object, mutated by the graph
        by_id = {id(v): name for name, v in kwargs.items() if type(v) is torch.Tensor}
        if not all(isinstance(value, torch.Tensor) for value in inputs):
            return None  # a symbolic size or a constant Dynamo computed: not ours to refill
        named = tuple((i, by_id[id(value)]) for i, value in enumerate(inputs) if id(value) in by_id)
        if not isinstance(outputs, (tuple, list)) or not hasattr(result, "keys"):
            return None
        out_index = {id(t): j for j, t in enumerate(outputs)}
        by_object = {id(v): name for name, v in objects.items()}
        fields = []
        for key in result.keys():
            value = result[key]
            if id(value) in out_index:
                fields.append((key, out_index[id(value)]))
            elif id(value) in by_object:
                fields.append((key, by_object[id(value)]))
            else:
                return None
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        try:
            return cls(graph, inputs, named, specs, objects, type(result), fields, modes)
        except TypeError:  # an object that takes no weak reference
            return None

    def same_as(self, other: Replay | None) -> bool:
        """Whether ``other`` (the next step's recording) fed the same graph the same way."""
        if other is None or other.graph is not self.graph or other.named != self.named or other.fields != self.fields:
            return False
        if self.inputs is None or other.inputs is None or other.objects.keys() != self.objects.keys() or any(
                ref() is not other.objects[name]() for name, ref in self.objects.items()):
            return False
        refilled = {i for i, _ in self.named}
        return all(i in refilled or a is b for i, (a, b) in enumerate(zip(self.inputs, other.inputs, strict=True)))

    def run(self, args: tuple, kwargs: dict):
        """The model's output for this step, or None where it differs from the recorded ones (then call Dynamo)."""
        if args or self.inputs is None or kwargs.keys() != self.names:
            return None
        for name, ref in self.objects.items():
            if kwargs[name] is not ref():
                return None
        for name, spec in self.specs.items():
            if input_spec(kwargs[name]) != spec:
                return None
        if (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) != self.modes:
            return None
        inputs = self.inputs.copy()
        for i, name in self.named:
            inputs[i] = kwargs[name]
        outputs = self.graph(*inputs)
        return self.result_type(**{key: outputs[j] if isinstance(j, int) else kwargs[j] for key, j in self.fields})
