"""Make ``import mmseg.models`` work on mmcv-lite.

mmsegmentation 1.2.2 wants mmcv 2.0-2.1 and imports ``mmcv.ops`` at module level, but mmcv-lite (a
pure-Python build of mmcv 2.1.0) ships ``mmcv/ops`` without its compiled ``mmcv._ext``, so the import
fails before any model is built. UperNet, FCN heads, Feature2Pyramid and the ViT backbones need none of
those ops. ``install()`` puts a small ``mmcv.ops`` module in ``sys.modules`` that holds:

- ``point_sample`` (and its file's helpers), loaded from mmcv's own pure-PyTorch ``point_sample.py``;
- for every other name, a placeholder that imports fine and raises ``CompiledOpError`` naming the op
  when it is called or instantiated, so a config that does need compiled mmcv fails clearly.

It does nothing when full mmcv (with ``mmcv._ext``) is installed. Call it before importing mmseg.
"""

import importlib.util
import sys
import types
from pathlib import Path


class CompiledOpError(RuntimeError):
    pass


def _needs_compiled(name: str):
    def fail(*args, **kwargs):
        raise CompiledOpError(
            f"mmcv.ops.{name} needs mmcv's compiled ops, which mmcv-lite does not have. Use a config "
            "without it (UperNet/FCN with CrossEntropyLoss need none), or install full mmcv 2.1.0 "
            "built from source (DESIGN.md §4)."
        )

    return type(name, (), {"__new__": lambda cls, *a, **k: fail(), "__call__": fail, "apply": staticmethod(fail)})


def _full_mmcv() -> bool:
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except ModuleNotFoundError:
        return False


def install() -> bool:
    """Install the shim; returns True if it was installed now, False if not needed or already there."""
    if _full_mmcv() or getattr(sys.modules.get("mmcv.ops"), "__dtm_compat__", False):
        return False
    import mmcv

    source = Path(mmcv.__file__).parent / "ops" / "point_sample.py"
    spec = importlib.util.spec_from_file_location("mmcv.ops.point_sample", source)
    point_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(point_sample)

    ops = types.ModuleType("mmcv.ops", __doc__)
    ops.__dtm_compat__ = True
    ops.__path__ = []  # a package, so `import mmcv.ops.point_sample` resolves through sys.modules
    ops.point_sample = point_sample.point_sample
    ops.SimpleRoIAlign = point_sample.SimpleRoIAlign

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _needs_compiled(name)

    ops.__getattr__ = __getattr__
    sys.modules["mmcv.ops"] = ops
    sys.modules["mmcv.ops.point_sample"] = point_sample
    mmcv.ops = ops
    return True
