"""What a job spec says about its model: the family and its widths, validated on construction.

Kept apart from ``training.models`` (which builds the networks) so that reading a spec never
imports torch: every CLI command parses specs, and importing torch costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from foundation.errors import SpecError

#: widest hidden layer we build: two 4096-wide layers already hold ~16.8M weights; DP-SGD's
#: noise grows with the parameter count, so wider buys nothing on tabular data and only
#: costs a job's memory.
MAX_HIDDEN = 4096


class ModelKind(StrEnum):
    LOGISTIC = "logistic"  # one Linear layer: inputs -> logits
    MLP = "mlp"  # Linear -> ReLU -> ... -> Linear, one hidden layer per ``hidden`` entry


@dataclass(frozen=True)
class ModelConfig:
    kind: ModelKind
    #: hidden layer widths, input side first; empty for logistic, non-empty for mlp
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            kind = ModelKind(self.kind)
        except ValueError:
            raise SpecError(
                "model.kind",
                "is not a known model",
                f"use one of: {', '.join(k.value for k in ModelKind)}",
            ) from None
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.hidden, tuple):
            raise SpecError(
                "model.hidden", "must be a tuple of layer widths", "e.g. hidden=(64, 64)"
            )
        for width in self.hidden:
            # bool is an int subclass: True would silently mean a 1-wide layer
            if not isinstance(width, int) or isinstance(width, bool):
                raise SpecError("model.hidden", "must hold whole numbers", "e.g. hidden=(64, 64)")
            if not 1 <= width <= MAX_HIDDEN:
                raise SpecError(
                    "model.hidden",
                    f"has a layer width outside 1..{MAX_HIDDEN}",
                    f"use widths between 1 and {MAX_HIDDEN}",
                )
        if kind is ModelKind.LOGISTIC and self.hidden:
            raise SpecError(
                "model.hidden",
                "must be empty for a logistic model",
                "drop hidden or use kind = mlp",
            )
        if kind is ModelKind.MLP and not self.hidden:
            raise SpecError(
                "model.hidden",
                "must list at least one hidden layer for an mlp",
                "e.g. hidden = [64, 64]",
            )


def linear_shapes(
    model: ModelConfig, n_inputs: int, n_outputs: int = 1
) -> dict[str, tuple[int, ...]]:
    """The state dict ``training.models.build_model`` gives, as shapes, without torch: an
    ``nn.Sequential`` of Linear layers with a ReLU between each two, so the Linear layers sit
    at indices 0, 2, 4, ... and each holds ``weight`` [out, in] and ``bias`` [out]. The release
    gate checks a job's weights against it and ``training.predict`` reads the layers by it."""
    widths = (n_inputs, *model.hidden, n_outputs)
    out: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        out[f"{2 * i}.weight"] = (fan_out, fan_in)
        out[f"{2 * i}.bias"] = (fan_out,)
    return out
