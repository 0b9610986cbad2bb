"""A fake `tensorrt` module whose engines run the exported ONNX graph on ONNX Runtime's CPU provider.

An engine file is the JSON description the fake build writes (`polygraphy_build`): the ONNX
path, the optimisation profiles and each one's activation memory, the TensorRT version it was
built with. Its tensors' names, modes, dtypes and shapes come from the ONNX graph (as a parsed
network's would). An execution reads its inputs from the bound addresses and writes its outputs
there when the stream runs it, so a captured `execute_async_v3` replays with the addresses set at
capture.

Contracts enforced as TensorRT documents them (a refusal is a False return and a logged error,
as the Python bindings do): tensor addresses 256-byte aligned (`set_tensor_address`); input
shapes of the right rank inside the active profile (`set_input_shape`; profile 0 unless
`set_optimization_profile_async` selected another, which unsets the input shapes); every input
shape and I/O address set, user-managed device memory of at least the active profile's
`get_device_memory_size_for_profile_v2` given (`set_device_memory`), before `execute_async_v3`;
outputs written in the dtype the engine declares. With CUDA graphs: a context's first execution
of a shape must happen outside capture (its lazy set-up would sync), no profile switch inside a
capture, and a captured graph is tied to the shapes, addresses and profile its contexts had at
capture (replaying after they changed is an illegal-address fault: one context per captured graph).
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from .cudart import FakeCudaRuntime, Fault, Op, cudaError_t

PLAN_FORMAT = "fake-tensorrt-plan/1"
ORT_TYPES = {
    "tensor(float)": "FLOAT",
    "tensor(float16)": "HALF",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}
BUILDER_FLAGS = {"FP16": 0, "TF32": 6}  # TensorRT's values of the flags the double has
_SESSIONS: dict[str, Any] = {}  # ONNX path -> InferenceSession, shared by every fake engine of a run


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.Enum):
    STRONGLY_TYPED = 1


class Dims(tuple):
    """TensorRT's shape type (a tuple; -1 marks a dynamic dimension)."""


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: int, msg: str) -> None:
        self.messages.append((severity, msg))


def session(path: str) -> Any:
    import onnxruntime as ort

    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


class ICudaEngine:
    """A deserialized fake plan: I/O from the ONNX graph, its profiles, ONNX Runtime as the kernels."""

    def __init__(self, module: types.ModuleType, desc: dict, logger: Logger) -> None:
        self.trt, self.desc, self.logger = module, desc, logger
        self.session = session(desc["onnx"])
        self.name = Path(desc["onnx"]).stem
        self.network = self.name.split("-")[0]
        self.io: dict[str, tuple[TensorIOMode, DataType, tuple]] = {}
        for mode, args in (
            (TensorIOMode.INPUT, self.session.get_inputs()),
            (TensorIOMode.OUTPUT, self.session.get_outputs()),
        ):
            for a in args:
                dtype = desc.get("dtypes", {}).get(a.name, ORT_TYPES[a.type])
                shape = tuple(desc.get("shapes", {}).get(a.name, a.shape))
                self.io[a.name] = (mode, DataType[dtype], shape)
        self.names = list(self.io)
        self.profiles = [{k: [tuple(p) for p in v] for k, v in prof.items()} for prof in desc["profiles"]]
        self.memory = [int(m) for m in desc["memory"]]
        self.device_memory_size_v2 = max(self.memory)
        if module.__version__.startswith("10."):
            self.device_memory_size = self.device_memory_size_v2  # removed in TensorRT 11
        self.num_optimization_profiles = len(self.profiles)
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self.runs = 0  # executions so far

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0] if name in self.io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(d if isinstance(d, int) else -1 for d in self.io[name][2])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if not 0 <= profile_index < len(self.profiles) or name not in self.profiles[profile_index]:
            self.logger.log(Logger.ERROR, f"no profile shape for {name!r} in profile {profile_index}")
            return []
        return [Dims(p) for p in self.profiles[profile_index][name]]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self.memory[profile_index]

    def create_execution_context(
        self, strategy: Any = ExecutionContextAllocationStrategy.STATIC
    ) -> IExecutionContext:
        return IExecutionContext(self, strategy)

    def _output_shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output shapes for these input shapes: named axes bound by the inputs, else one zero run."""
        key = tuple(sorted(inputs.items()))
        if key not in self._shapes:
            bound: dict[str, int] = {}
            for name, shape in inputs.items():
                for d, s in zip(self.io[name][2], shape):
                    if isinstance(d, str):
                        bound[d] = s
            outs = {n: v[2] for n, v in self.io.items() if v[0] == TensorIOMode.OUTPUT}
            shapes = {
                n: tuple(bound.get(d, -1) if isinstance(d, str) else d for d in s) for n, s in outs.items()
            }
            if any(-1 in s for s in shapes.values()):
                feeds = {n: np.zeros(s, self._onnx_dtype(n)) for n, s in inputs.items()}
                shapes = dict(zip(self._outputs(), (tuple(o.shape) for o in self.session.run(None, feeds))))
            self._shapes[key] = shapes
        return self._shapes[key]

    def _outputs(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def _onnx_dtype(self, name: str) -> Any:
        onnx_type = {a.name: a.type for a in self.session.get_inputs()}[name]
        return NUMPY[ORT_TYPES[onnx_type]]


class IExecutionContext:
    """Shapes, addresses and device memory of one execution; `execute_async_v3` enqueues it."""

    def __init__(self, engine: ICudaEngine, strategy: Any) -> None:
        self.engine = engine
        self.rt: FakeCudaRuntime = engine.trt._cuda
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.warm: set[tuple] = set()  # input shapes this context has executed outside capture
        self.active_optimization_profile = 0
        self.user_managed = strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        if not self.user_managed:
            err, ptr = self.rt.cudaMalloc(max(engine.device_memory_size_v2, 1))
            self.memory = (ptr, engine.device_memory_size_v2) if not err else None

    def _error(self, msg: str) -> bool:
        self.engine.logger.log(Logger.ERROR, f"{self.engine.name}: {msg}")
        return False

    def set_input_shape(self, name: str, shape: Any) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return self._error(f"{name!r} is not an input tensor")
        shape = tuple(int(s) for s in shape)
        profile = self.engine.profiles[self.active_optimization_profile]
        lo, _, hi = profile.get(name, [self.engine.get_tensor_shape(name)] * 3)
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return self._error(f"shape {shape} of {name!r} is outside the profile [{lo}, {hi}]")
        self.shapes[name] = shape
        return True

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return self._error(f"optimization profile {profile_index} does not exist")
        if int(stream_handle) not in self.rt.streams:
            return self._error(f"stream {stream_handle!r} is not a CUDA stream")
        if self.rt.capture_of(int(stream_handle)) is not None:
            return self._error("profile switch inside a CUDA-graph capture")
        self.active_optimization_profile = profile_index
        self.shapes = {}  # TensorRT: switching invalidates the dynamic input shapes
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.io:
            return self._error(f"{name!r} is not an I/O tensor")
        if int(memory) % 256:
            return self._error(f"address {int(memory):#x} of {name!r} is not 256-byte aligned")
        self.addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def get_tensor_shape(self, name: str) -> Dims:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return Dims(self.shapes.get(name, self.engine.get_tensor_shape(name)))
        if set(self.shapes) != set(self._inputs()):
            return self.engine.get_tensor_shape(name)
        return Dims(self.engine._output_shapes(self.shapes)[name])

    def set_device_memory(self, memory: int, size: int) -> None:
        need = min(self.engine.memory)  # what any profile needs; execution checks the active one's
        if size < need:
            self._error(f"device memory of {size} bytes is smaller than any profile's ({need})")
        elif int(memory) % 256:
            self._error(f"device memory {int(memory):#x} is not 256-byte aligned")
        else:
            self.memory = (int(memory), int(size))

    def _inputs(self) -> list[str]:
        return [n for n, v in self.engine.io.items() if v[0] == TensorIOMode.INPUT]

    def _state(self) -> tuple:
        return (tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items())), self.memory)

    def execute_async_v3(self, stream_handle: int) -> bool:
        rt, eng = self.rt, self.engine
        if int(stream_handle) not in rt.streams:
            return self._error(f"stream {stream_handle!r} is not a CUDA stream")
        if self.memory is None:
            return self._error("no device memory set (user-managed allocation strategy)")
        need = eng.memory[self.active_optimization_profile]
        if self.memory[1] < need:
            return self._error(f"device memory of {self.memory[1]} bytes is smaller than profile's {need}")
        missing = [n for n in self._inputs() if n not in self.shapes]
        if missing:
            return self._error(f"input shapes not set: {missing}")
        unbound = [n for n in eng.names if n not in self.addresses]
        if unbound:
            return self._error(f"tensor addresses not set: {unbound}")
        capture = rt.capture_of(int(stream_handle))
        key = tuple(sorted(self.shapes.items()))
        if capture is not None and key not in self.warm:
            capture.invalidated = capture.invalidated or f"{eng.name}: first execution of {key} in a capture"
            return self._error(
                "first execution of these shapes inside a CUDA-graph capture (run it once first)"
            )
        state, shapes, addresses, memory = self._state(), dict(self.shapes), dict(self.addresses), self.memory
        active = self.active_optimization_profile
        outs = eng._output_shapes(shapes)

        def run(replay: bool) -> None:
            if replay and (self._state() != state or self.active_optimization_profile != active):
                raise Fault(
                    cudaError_t.cudaErrorIllegalAddress,
                    f"{eng.name}: the context's shapes or addresses changed after this graph captured it",
                )
            self._run(shapes, addresses, (memory[0], eng.memory[active]), outs)

        err = rt.enqueue(int(stream_handle), Op(f"{eng.name} execute", run))
        if err:
            return self._error(f"enqueue failed: {err.name}")
        if capture is None:
            self.warm.add(key)
        return True

    def _run(self, shapes: dict, addresses: dict, memory: tuple[int, int], outs: dict) -> None:
        rt, eng = self.rt, self.engine
        eng.runs += 1
        rt.device_view(*memory)[:] = eng.runs % 251  # its activations: the active profile's size
        feeds = {}
        for name, shape in shapes.items():
            dtype = NUMPY[eng.io[name][1].name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            value = np.frombuffer(rt.read(addresses[name], nbytes), dtype).reshape(shape)
            feeds[name] = value.astype(eng._onnx_dtype(name))
        results = eng.session.run(None, feeds)
        tamper = eng.trt.tamper.get(eng.network)
        for name, value in zip(eng._outputs(), results):
            if tuple(value.shape) != outs[name]:
                raise Fault(
                    cudaError_t.cudaErrorIllegalAddress,
                    f"{name}: produced {value.shape}, planned {outs[name]}",
                )
            if tamper:
                value = tamper(name, value)
            rt.write(addresses[name], np.ascontiguousarray(value.astype(NUMPY[eng.io[name][1].name])))


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        module = self._module
        try:
            desc = json.loads(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            self.logger.log(Logger.ERROR, "the serialized engine is not a plan")
            return None
        if desc.get("format") != PLAN_FORMAT:
            self.logger.log(Logger.ERROR, f"unknown plan format {desc.get('format')!r}")
            return None
        if desc.get("tensorrt") != module.__version__:
            self.logger.log(
                Logger.ERROR, f"plan built by TensorRT {desc.get('tensorrt')}, running {module.__version__}"
            )
            return None
        return module.ICudaEngine(module, desc, self.logger)  # a double may swap the kernels


def make_module(cuda: FakeCudaRuntime, version: str) -> types.ModuleType:
    """A `tensorrt` module of `version` ("10.x" keeps BuilderFlag.FP16, "11.x" has strong typing only)."""
    module = types.ModuleType("tensorrt")
    flags = ["TF32", "FP16"] if version.startswith("10.") else ["TF32"]  # 11.x: no weak typing flags
    module.__dict__.update(
        __version__=version,
        _cuda=cuda,
        tamper={},  # network -> fn(output name, array) -> array: a deliberately wrong engine (tests)
        Logger=Logger,
        DataType=DataType,
        TensorIOMode=TensorIOMode,
        ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
        MemoryPoolType=MemoryPoolType,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        BuilderFlag=enum.Enum("BuilderFlag", {f: BUILDER_FLAGS[f] for f in flags}),
        Dims=Dims,
        ICudaEngine=ICudaEngine,
        IExecutionContext=IExecutionContext,
        Runtime=type("Runtime", (Runtime,), {"_module": module}),
    )
    return module
