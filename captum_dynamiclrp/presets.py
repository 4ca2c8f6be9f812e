"""Named rule sets.

=========  ===========================================================================
preset     what changes
=========  ===========================================================================
epsilon    default. Epsilon-LRP on linear maps with a parameter (mm, addmm, conv);
           equals Input x Gradient as eps -> 0 on ReLU networks.
gamma      generalised gamma-LRP (``gamma=0.25``) on linear maps with a parameter.
zplus      z+-LRP (positive contributions only) on linear maps with a parameter.
attnlrp    AttnLRP (Achtibat et al. 2024): epsilon on linear maps and sums, identity
           on nonlinearities and RMS norm, constant normaliser in layer norm,
           bilinear uniform on products of two activations, Deep-Taylor softmax.
           These are also the rules every other preset uses for those ops, so
           ``attnlrp`` equals ``epsilon`` op by op; it is named for transformers.
cp-lrp     as attnlrp, but attention probabilities are constants (Ali et al. 2022):
           relevance flows through the values only.
=========  ===========================================================================

Every op not named here uses the same rule in all presets (see
:mod:`captum_dynamiclrp.rules`). Any preset takes ``batch_norm="merge"``
(``DynamicLRP(model, batch_norm="merge")``): a batch norm that alone reads a
convolution's output is merged into that convolution, as Zennit's canonizers do,
instead of getting the epsilon rule as a layer of its own. The default preset is ``"epsilon"`` with
``epsilon=1e-6``, fit for CNNs and transformers alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Union

from .rules.attention import CP_LRP_OVERRIDES
from .rules.base import OpSpec, RuleSettings


BATCH_NORM_RULES = ("epsilon", "merge")


@dataclass(frozen=True)
class Preset:
    """A named rule set.

    Args:
        name (str): Name shown in reports.
        linear (str): ``"epsilon"``, ``"gamma"`` or ``"zplus"`` for linear maps with a parameter.
        epsilon (float): Stabiliser of every denominator.
        gamma (float): Strength of the gamma rule.
        attention (str): ``"attnlrp"`` or ``"cp"`` (attention probabilities constant).
        batch_norm (str): ``"epsilon"`` (default: a layer of its own) or ``"merge"`` (merged into
            the convolution before it; see :mod:`captum_dynamiclrp.rules.linear`).
        overrides (Mapping[str, OpSpec]): Per-op rule table entries (autograd node type
            name to :class:`~captum_dynamiclrp.rules.OpSpec`) replacing the built-in ones.
    """

    name: str
    linear: str = "epsilon"
    epsilon: float = 1e-6
    gamma: float = 0.25
    attention: str = "attnlrp"
    overrides: Mapping[str, OpSpec] = field(default_factory=dict)
    batch_norm: str = "epsilon"

    def __post_init__(self) -> None:
        if self.linear not in ("epsilon", "gamma", "zplus"):
            raise ValueError(f"unknown linear rule {self.linear!r}; use 'epsilon', 'gamma' or 'zplus'")
        if self.attention not in ("attnlrp", "cp"):
            raise ValueError(f"unknown attention rule {self.attention!r}; use 'attnlrp' or 'cp'")
        if self.batch_norm not in BATCH_NORM_RULES:
            raise ValueError(f"unknown batch_norm rule {self.batch_norm!r}; use 'epsilon' or 'merge'")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")

    def settings(self) -> RuleSettings:
        return RuleSettings(
            epsilon=self.epsilon, linear=self.linear, gamma=self.gamma, attention=self.attention,
            batch_norm=self.batch_norm,
        )

    def table_overrides(self) -> dict[str, OpSpec]:
        """Rule table entries this preset replaces (CP-LRP's constant softmax, then user overrides)."""
        base = dict(CP_LRP_OVERRIDES) if self.attention == "cp" else {}
        return {**base, **self.overrides}


PRESETS: dict[str, Preset] = {
    "epsilon": Preset("epsilon"),
    "gamma": Preset("gamma", linear="gamma"),
    "zplus": Preset("zplus", linear="zplus"),
    "attnlrp": Preset("attnlrp"),
    "cp-lrp": Preset("cp-lrp", attention="cp"),
}
DEFAULT_PRESET = "epsilon"


def resolve_preset(
    rules: Union[str, Preset, Mapping[str, OpSpec], None] = None,
    epsilon: Optional[float] = None,
    gamma: Optional[float] = None,
    batch_norm: Optional[str] = None,
) -> Preset:
    """Turn a preset name, a :class:`Preset` or a mapping of per-op overrides into a Preset.

    ``epsilon``, ``gamma`` and ``batch_norm``, when given, replace the preset's values.
    """
    if rules is None:
        preset = PRESETS[DEFAULT_PRESET]
    elif isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown preset {rules!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[rules]
    elif isinstance(rules, Preset):
        preset = rules
    elif isinstance(rules, Mapping):
        preset = replace(PRESETS[DEFAULT_PRESET], name="custom", overrides=dict(rules))
    else:
        raise TypeError(f"rules must be a preset name, a Preset or a mapping, got {type(rules).__name__}")
    changes = {}
    if epsilon is not None:
        changes["epsilon"] = epsilon
    if gamma is not None:
        changes["gamma"] = gamma
    if batch_norm is not None:
        changes["batch_norm"] = batch_norm
    return replace(preset, **changes) if changes else preset
