"""Widget values checked when a prompt is queued, for every node of the pack (``CheckedNode``)."""

from __future__ import annotations

import inspect
import math
import types

from comfy_api.v0_0_2 import io


class CheckedNode(io.ComfyNode):
    """A node whose widget values are checked against its own schema when the prompt is queued.

    ComfyUI 0.3.64 never checks a V3 combo's value, lets NaN and infinity through every FLOAT, passes a
    literal value given where a link belongs (``"model": {"a": 1}``) to the node as it is, and skips its
    own checks for the inputs a validate_inputs names. So each subclass gets a validate_inputs naming its
    FLOATs, combos, link inputs and the inputs its ``relations`` reads (ComfyUI reports a failure once per
    named input: naming every input would repeat it on each), checking them by the schema, then the
    relations. Linked inputs are not known at queue time (None here): execute checks them."""

    FILE_INPUTS: tuple[str, ...] = ()  # combos listing files: their node's relations say what is missing
    unavailable: str | None = None  # why this ComfyUI cannot run the node (nodes/selfcheck.py), else None

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs):  # noqa: N802 - ComfyUI's name for running a V3 node
        if cls.unavailable:
            from .errors import InputError

            raise InputError(cls.unavailable)
        return super().EXECUTE_NORMALIZED(*args, **kwargs)

    @classmethod
    def relations(cls, **values: object) -> str | None:
        """What is wrong between inputs (``tau1 < tau2``), or None; values are None when linked."""
        return None


def _checked_names(cls: type[CheckedNode]) -> list[str]:
    own = [i.id for i in cls.define_schema().inputs
           if isinstance(i, (io.Float.Input, io.Combo.Input)) or not isinstance(i, io.WidgetInput)]
    related = [p.name for p in inspect.signature(cls.relations).parameters.values()
               if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return list(dict.fromkeys(own + related))


def _validator(names: list[str]):
    def validate_inputs(cls, **values: object) -> bool | str:  # ComfyUI passes keywords only
        return cls.unavailable or schema_problem(cls, **{k: v for k, v in values.items() if k not in cls.FILE_INPUTS}) or \
            cls.relations(**values) or True

    # ComfyUI passes (and skips its own checks for) exactly the parameters this signature names.
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    validate_inputs.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", keyword), *(inspect.Parameter(n, keyword, default=None) for n in names)])
    return validate_inputs


class _ValidateInputs:
    """CheckedNode.validate_inputs: made for the class it is read from, when it is read (a node's schema
    may list files that exist only once its module has loaded)."""

    def __get__(self, _obj: object, cls: type[CheckedNode]) -> types.MethodType:
        names = [] if cls is CheckedNode else _checked_names(cls)  # ComfyUI reads it on the base class too
        return types.MethodType(_validator(names), cls)


CheckedNode.validate_inputs = _ValidateInputs()


def schema_problem(cls: type[io.ComfyNode], **values: object) -> str | None:
    """What is wrong with widget values by the node's own schema: a number that is NaN, infinite or out of
    range, a choice that is not offered; None when all are fine (or linked: None)."""
    specs = {i.id: i for i in cls.define_schema().inputs}  # not GET_SCHEMA: it writes to the (locked) class
    for name, value in values.items():
        spec = specs.get(name)
        if value is None or spec is None:
            continue
        if isinstance(spec, (io.Int.Input, io.Float.Input)):
            span = f"between {spec.min} and {spec.max}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"{name} must be a number {span}, not {value!r}"
            if not math.isfinite(value):
                return f"{name} is {value}: it must be a finite number {span}"
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                return f"{name} is {value}: it must be {span}"
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            return f"{name} {value!r:.80} is not one of the choices: {', '.join(map(str, spec.options))}"
        elif not isinstance(spec, io.WidgetInput):  # a link (None at queue time) given a value in the prompt
            return f"{name} must be connected to a {spec.get_io_type()} output, not given the value {value!r:.60}"
    return None
