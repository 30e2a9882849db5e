"""Per-module quantization settings in GPTQModel's ``dynamic`` syntax: the one resolver.

A *dynamic* is a mapping ``{rule: override}``. Each rule is a regular expression over Hugging
Face module names (``"model.layers.0.self_attn.q_proj"``, ``"transformer.h.3.mlp.c_proj"``):

- ``"-:REGEX"``: matching modules are **not quantized**; they keep their full-precision weight
  (the override, usually ``{}``, is ignored);
- ``"+:REGEX"`` or a bare ``"REGEX"``: matching modules are quantized with the base settings
  updated by the override (``{"bits": 8}`` changes the bit width and keeps the group size, sym …).

Resolving one module: the negative (``-``) rules are tried first, then the others, each group in
its given order; the **first** rule whose regex matches wins; a module no rule matches gets the
base settings. A regex matches when it matches at the *start* of the name (``re.match``), not
necessarily the whole name: ``".*\\.layers\\.1\\."`` matches layer 1 only, ``".*\\.layers\\.1"``
matches layers 1, 10–19 too; end a rule with ``$`` to match whole names.

Verified against the installed GPTQModel 7.6.0, ``gptqmodel/quantization/config.py``:

- ``BaseQuantizeConfig.__post_init__`` reorders ``dynamic`` so that keys starting with ``-`` come
  first (each group keeping its order), and a saved ``quantize_config.json`` holds that order;
- ``_resolve_dynamic_override`` returns the first matching rule's override, or ``False`` when that
  rule starts with ``-:`` (``None`` when nothing matches); patterns are compiled with ``pcre``
  and tried with ``.match`` (anchored at the start only); a pattern ``^literal$`` is looked up by
  string equality, which is what ``re.match`` of that pattern does too;
- ``dynamic_get(name, key, default)`` returns the override's value for ``key`` and the base
  ``default`` for keys the override does not name; the GPTQ processor
  (``looper/gptq_processor.py``) resolves ``bits``, ``sym``, ``group_size``, ``desc_act`` … per
  module that way and skips modules whose ``dynamic_get`` is ``False``.

``tests/test_dynamic.py`` checks :func:`resolve` against GPTQModel's own ``dynamic_get``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from mechq.vocab import SUPPORTED_BITS

Dynamic = Mapping[str, Mapping[str, Any]]

SKIP, OVERRIDE = "-:", "+:"
# What each method honours in an override (GPTQModel honours more, e.g. damp_percent, and
# checks them itself); mechq's RTN has no calibration, so desc_act means nothing to it.
RTN_KEYS = frozenset({"bits", "group_size", "sym"})


def ordered(dynamic: Dynamic | None) -> list[tuple[str, Mapping[str, Any]]]:
    """The rules in the order they are tried: negative rules first, each group as given."""
    items = list((dynamic or {}).items())
    return [kv for kv in items if kv[0].startswith("-")] + [
        kv for kv in items if not kv[0].startswith("-")]


def pattern(rule: str) -> str:
    """The regex of a rule, without its ``-:`` / ``+:`` prefix."""
    return rule[2:] if rule.startswith((SKIP, OVERRIDE)) else rule


def rule_for(module: str, dynamic: Dynamic | None) -> str | None:
    """The rule that decides ``module`` (see the module docstring), or None if none matches."""
    for rule, _ in ordered(dynamic):
        if re.match(pattern(rule), module):
            return rule
    return None


def resolve(module: str, base: Mapping[str, Any], dynamic: Dynamic | None) -> dict | None:
    """The settings ``module`` is quantized with: ``base`` updated by the winning override, or
    ``None`` when a ``-:`` rule wins (the module is not quantized)."""
    rule = rule_for(module, dynamic)
    if rule is None:
        return dict(base)
    if rule.startswith(SKIP):
        return None
    return {**base, **dynamic[rule]}


def skipped(module: str, dynamic: Dynamic | None) -> bool:
    """True when ``dynamic`` leaves ``module`` unquantized (a ``-:`` rule decides it)."""
    rule = rule_for(module, dynamic)
    return rule is not None and rule.startswith(SKIP)


def check(dynamic: Dynamic | None, keys: frozenset[str] | None = None) -> dict | None:
    """Validate rules and overrides; return a plain ``dict`` copy (``None`` for none or ``{}``).

    Raises ``ValueError`` for a rule that is not a string or not a valid regex, an override that
    is not a mapping, ``bits`` outside :data:`~mechq.vocab.SUPPORTED_BITS`, a ``group_size`` that
    is neither -1 nor positive, a non-bool ``sym``, or (with ``keys``) an override key outside
    ``keys``.
    """
    if not dynamic:
        return None
    if not isinstance(dynamic, Mapping):
        raise ValueError(f"dynamic must be a mapping {{rule: override}}, got "
                         f"{type(dynamic).__name__}")
    out = {}
    for rule, override in dynamic.items():
        if not isinstance(rule, str) or not pattern(rule):
            raise ValueError(f"dynamic rule {rule!r} must be a non-empty regex string")
        try:
            re.compile(pattern(rule))
        except re.error as e:
            raise ValueError(f"dynamic rule {rule!r} is not a valid regex ({e})") from None
        if not isinstance(override, Mapping):
            raise ValueError(f"dynamic rule {rule!r}: the override must be a mapping such as "
                             f"{{'bits': 8}} (or {{}} for a '-:' rule), got {override!r}")
        if rule.startswith(SKIP):
            out[rule] = dict(override)
            continue
        if keys is not None and set(override) - keys:
            raise ValueError(f"dynamic rule {rule!r}: {sorted(set(override) - keys)} cannot be "
                             f"set per module here; use {sorted(keys)}")
        if "bits" in override and override["bits"] not in SUPPORTED_BITS:
            raise ValueError(f"dynamic rule {rule!r}: bits must be one of {SUPPORTED_BITS}, "
                             f"got {override['bits']!r}")
        gs = override.get("group_size", -1)
        if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs > 0):
            raise ValueError(f"dynamic rule {rule!r}: group_size must be -1 or positive, "
                             f"got {gs!r}")
        if not isinstance(override.get("sym", True), bool):
            raise ValueError(f"dynamic rule {rule!r}: sym must be True or False, "
                             f"got {override['sym']!r}")
        out[rule] = dict(override)
    return out


def canonical(dynamic: Dynamic) -> str:
    """The rules as they resolve, in one JSON string: tried order, override keys sorted. Two
    dynamics with the same canonical string resolve every module the same way."""
    return json.dumps([[rule, dict(o)] for rule, o in ordered(dynamic)], sort_keys=True)


def digest(dynamic: Dynamic) -> str:
    """sha256 of :func:`canonical` (hex): names and cache keys of dynamic variants use it."""
    return hashlib.sha256(canonical(dynamic).encode()).hexdigest()
