"""Load a recipe: YAML files with ``defaults:`` inheritance, ``${...}`` interpolation and
Hydra-style command-line overrides, validated against the typed schema before any work starts.

Order of precedence (later wins): schema defaults < ``defaults:`` files (in list order, each
resolved recursively) < the recipe file itself < command-line overrides. Every error names the
key and the file (or "command line") the offending value came from, and all errors are reported
at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from igrpo_megatron.config.algorithm import LOSS_VARIANTS, variant_fields
from igrpo_megatron.config.errors import UserError
from igrpo_megatron.config.files import write_text
from igrpo_megatron.config.schema import RecipeConfig
from igrpo_megatron.config.validate import MISSING_MARK, SchemaError, build_dataclass, schema_defaults

logger = logging.getLogger(__name__)

COMMAND_LINE = "command line"
DEFAULTS_KEY = "defaults"


class RecipeError(UserError, ValueError):
    """A recipe could not be loaded; the message lists every problem with its key and file."""


class MissingValuesError(RecipeError):
    """Required values are still ``???``; ``keys`` names them (dotted)."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf keys of a (nested) mapping as dotted paths."""
    out: dict[str, Any] = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = node
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _resolve_default_path(entry: Any, parent: Path) -> Path:
    if not isinstance(entry, str):
        raise RecipeError(f"{parent}: 'defaults' entries must be recipe file names, got {entry!r}")
    path = (parent.parent / entry).resolve()
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    return path


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The recipe and everything it inherits, base first: ``[(file, content), ...]``."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"'defaults' cycle: {cycle}")
    data = _read_yaml(path)
    defaults = data.pop(DEFAULTS_KEY, []) or []
    if not isinstance(defaults, list):
        raise RecipeError(f"{path}: 'defaults' must be a list of recipe files")
    layers: list[tuple[Path, dict[str, Any]]] = []
    for entry in defaults:
        layers.extend(_load_layers(_resolve_default_path(entry, path), (*chain, path)))
    layers.append((path, data))
    return layers


def _apply_overrides(cfg: DictConfig, overrides: list[str], known: set[str],
                     origin: dict[str, str]) -> None:
    """Apply ``a.b=1``, ``+a.new=2``, ``++a.b=3`` and ``~a.b`` with Hydra's own override parser."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise RecipeError(f"{COMMAND_LINE}: cannot parse overrides: {exc}") from None
    for ov in parsed:
        key = ov.key_or_group
        exists = _present(cfg, key) or key in known
        if ov.is_delete():
            if not exists:
                raise RecipeError(f"{COMMAND_LINE}: cannot delete '~{key}': no such key")
            _delete(cfg, key)
            origin.pop(key, None)
            continue
        if ov.is_add() and exists:
            raise RecipeError(f"{COMMAND_LINE}: '+{key}' adds a key, but {key} already exists; "
                              f"use '{key}=...' to change it (or '++{key}=...')")
        if not ov.is_add() and not ov.is_force_add() and not exists:
            raise RecipeError(f"{COMMAND_LINE}: unknown key '{key}'; check the spelling "
                              f"(`igrpo config show RECIPE` lists every key) or use '+{key}=...' to add one")
        try:
            OmegaConf.update(cfg, key, ov.value(), merge=True, force_add=True)
        except OmegaConfBaseException as exc:
            raise RecipeError(f"{COMMAND_LINE}: cannot set '{key}': {str(exc).splitlines()[0]}") from None
        for leaf in _flatten({key: ov.value()}) or {key: None}:
            origin[leaf] = COMMAND_LINE


_ABSENT = object()


def _present(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is set, without resolving it (an earlier override may hold a broken ``${...}``)."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is not _ABSENT


def _check_shapes(schema: Any, user: Any, origin: dict[str, str], prefix: str = "") -> None:
    """A section of the schema (a mapping of settings) given as a list or a scalar is a RecipeError naming it."""
    if not isinstance(schema, dict) or not isinstance(user, dict):
        return
    for key, value in user.items():
        if key not in schema:
            continue
        dotted = f"{prefix}{key}"
        if isinstance(schema[key], dict) and schema[key] and not isinstance(value, dict):
            where = next((o for k, o in origin.items() if k == dotted or k.startswith(dotted + ".")), "the recipe")
            raise RecipeError(f"{dotted} (from {where}): must be a mapping of settings ({', '.join(list(schema[key])[:4])}"
                              f", ...), got {type(value).__name__} {value!r}")
        _check_shapes(schema[key], value, origin, dotted + ".")


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        parent.pop(leaf)


def compose(recipe_path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge files and overrides; return the resolved plain dict and where each key came from."""
    defaults = OmegaConf.create(schema_defaults(RecipeConfig))
    known = set(_flatten(OmegaConf.to_container(defaults)))
    user = OmegaConf.create({})
    origin: dict[str, str] = {}
    missing_marks: set[str] = set()
    layers: list[str] = []  # where values come from, in precedence order (command line last)
    for path, data in _load_layers(Path(recipe_path)):
        layers.append(str(path))
        try:
            user = OmegaConf.merge(user, OmegaConf.create(data))
        except OmegaConfBaseException as exc:
            raise RecipeError(f"{path}: {exc}") from None
        for key, value in _flatten(data).items():
            origin[key] = str(path)
            _track_missing(missing_marks, key, value)
    _apply_overrides(user, overrides or [], known, origin)
    for key in list(missing_marks):
        if origin.get(key) == COMMAND_LINE:
            missing_marks.discard(key)
    _check_shapes(schema_defaults(RecipeConfig), OmegaConf.to_container(user), origin)
    try:
        merged = OmegaConf.merge(defaults, user)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "the recipe"
        raise RecipeError(f"{key} (from {origin.get(key, ', '.join(layers))}): {str(exc).splitlines()[0]}") from None
    # OmegaConf never lets ??? replace a value in a merge, so ??? marks are tracked per layer.
    missing = sorted(missing_marks | set(_missing_leaves(merged)))
    if missing:
        raise MissingValuesError("\n".join(
            f"{k}: required value is missing (marked ??? in {origin.get(k, 'the schema')}); "
            f"set it in the recipe or on the command line as {k}=..." for k in missing), missing)
    try:
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise RecipeError(f"{key} (from {origin.get(key, 'the schema')}): cannot resolve interpolation: "
                          f"{str(getattr(exc, 'msg', exc)).splitlines()[0]}") from None
    _apply_variant(resolved, origin, [*layers, COMMAND_LINE])
    return resolved, origin


VARIANT_KEY = "algorithm.variant"


def _apply_variant(resolved: dict[str, Any], origin: dict[str, str], layers: list[str]) -> None:
    """Write ``algorithm.variant``'s fields into ``resolved``, except those the recipe sets itself.

    A field set in the file that names the variant, in a file inheriting from it, or on the command
    line wins; one set only in a file the variant's file inherits from (or nowhere) takes the
    variant's value, so ``variant: dapo`` over a base that spells out GRPO's clips gives DAPO's.
    """
    algo = resolved.get("algorithm")
    name = algo.get("variant") if isinstance(algo, dict) else None
    if name not in LOSS_VARIANTS:
        return  # null, or a name the schema check reports
    rank = {where: i for i, where in enumerate(layers)}
    variant_from = origin.get(VARIANT_KEY, "the schema")
    at = rank.get(variant_from, -1)
    max_tokens = resolved.get("rollout", {}).get("sampling", {}).get("max_tokens")
    for dotted, value in variant_fields(name, max_length=max_tokens).items():
        key = f"algorithm.{dotted}"
        if key in origin and rank.get(origin[key], -1) >= at:
            continue
        section, field = dotted.split(".")
        algo.setdefault(section, {})[field] = value
        origin[key] = f"{variant_from} ({VARIANT_KEY}={name})"


def _track_missing(marks: set[str], key: str, value: Any) -> None:
    if value == MISSING_MARK:
        marks.add(key)
    else:
        marks.discard(key)


def _missing_leaves(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            if OmegaConf.is_missing(cfg, k):
                out.append(full)
            else:
                child = cfg._get_node(k)
                if isinstance(child, (DictConfig, ListConfig)):
                    out.extend(_missing_leaves(child, full))
    return out


def load_recipe(recipe_path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Load, merge, override, resolve and validate a recipe. Raises :class:`RecipeError`."""
    resolved, origin = compose(recipe_path, overrides)
    try:
        recipe = build_dataclass(RecipeConfig, resolved, origin)
    except SchemaError as exc:
        raise RecipeError(f"invalid recipe {recipe_path}:\n{exc}") from None
    logger.debug("loaded recipe %s with %d overrides", recipe_path, len(overrides or []))
    return recipe


def recipe_to_yaml(recipe: RecipeConfig) -> str:
    return yaml.safe_dump(asdict(recipe), sort_keys=False, default_flow_style=False)


def save_resolved_recipe(recipe: RecipeConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved recipe to ``<run_dir>/recipe.yaml`` (temporary file, then rename)."""
    return write_text(Path(run_dir) / "recipe.yaml", recipe_to_yaml(recipe))
