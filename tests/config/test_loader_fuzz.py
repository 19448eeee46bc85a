"""The recipe loader fuzzed (issue 17, item 8): whatever the YAML and the overrides, either a recipe
or a :class:`UserError` (``RecipeError``/``SchemaError``) whose message says where; never a traceback
from inside the loader, OmegaConf, Hydra's parser or the schema.

Hypothesis generates: arbitrary text as a recipe file; YAML mappings over the real section and key
names with values of every YAML type (nested, null, huge numbers, interpolations, ``???``); and
command-line overrides (``key=value``, ``+key=``, ``~key``, garbage). Examples are bounded
(``max_examples``) and have no deadline: the machine running CI is shared.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.loader import load_recipe
from igrpo_megatron.config.schema import RecipeConfig

pytestmark = pytest.mark.faults

# derandomize: CI sees the same examples on every run (a failure found there reproduces); run with
# `--hypothesis-seed=random`-style settings locally to explore further.
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _keys(cls=RecipeConfig, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            out += _keys(type(sub), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


KEYS = _keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["???", "${run.seed}", "${nope.nothing}", "${", "[1, 2", "{a: 1}", "1e999"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
key_names = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.text(max_size=12))


def _check(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        try:
            recipe = load_recipe(path, overrides)
        except UserError as exc:
            message = str(exc)
            assert message.strip(), "an empty error message"
            assert "Traceback" not in message
            return
        assert isinstance(recipe, RecipeConfig)


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return out


@FUZZ
@given(st.text(max_size=200))
def test_any_text_as_a_recipe_file(text):
    _check(text, [])


@FUZZ
@given(st.dictionaries(key_names, values, max_size=5))
def test_yaml_over_the_real_keys_with_values_of_any_type(flat):
    _check(yaml.safe_dump(_nest(flat), allow_unicode=True), [])


overrides = st.one_of(
    st.builds(lambda p, k, v: f"{p}{k}={v}", st.sampled_from(["", "+", "++", "~"]), key_names,
              st.one_of(st.text(max_size=12), scalars.map(lambda v: yaml.safe_dump(v).split("\n")[0]))),
    st.text(max_size=20),
)


@FUZZ
@given(st.lists(overrides, max_size=4))
def test_command_line_overrides_of_any_shape(items):
    _check("run:\n  name: fuzz\n", items)


def test_a_wrong_type_names_the_key_and_the_line():
    """What a fuzz failure must look like: the key, the file, and for YAML errors the line."""
    with pytest.raises(UserError, match=r"trainer\.num_steps"):
        _raise("trainer:\n  num_steps: [1, 2]\n")
    with pytest.raises(UserError, match=r"recipe\.yaml: line \d+, column \d+: not valid YAML"):
        _raise("run:\n  name: x\n  seed: [1\n")


def _raise(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yaml")
        with open(path, "w") as fh:
            fh.write(text)
        load_recipe(path)
