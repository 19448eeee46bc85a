"""``igrpo data fetch``: download the public evaluation sets and write them where the built-ins read them.

    igrpo data fetch aime24 aime25 math500 amc23 --to DIR [--base-url URL]

``SOURCES`` is the one table of where each set comes from: a file pinned to a commit in a public
GitHub repository, fetched as ``{base_url}/{repo}/{commit}/{path}`` (``base_url`` defaults to
raw.githubusercontent.com; ``--base-url`` names a mirror with the same layout). Every source is
JSON Lines (NeMo-Skills names its AIME files ``test.txt``) and already uses the field names the
built-in benchmarks read (``expected_answer`` for AIME, ``answer`` for MATH-500 and AMC23), so the
conversion parses the original, keeps its rows and fields as they are and writes ``<name>.jsonl``.

Each file is checked before anything reaches ``--to``: its row count against the table (a cut-off
download or a changed source shows here) and every row through the built-in loader
(``load_benchmark``: problem text, a gold answer of the benchmark's answer type, unique ids). All
files are staged in a temporary folder beside ``--to`` and moved in with ``os.replace`` only when
every one passed, so a failure leaves ``--to`` as it was and names the source that failed.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from igrpo_megatron.evaluation.benchmarks import (
    BUILTIN_BENCHMARKS,
    DATA_DIR_ENV,
    BenchmarkError,
    load_benchmark,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
TIMEOUT_S = 60.0  # per request: connecting and each read


@dataclass(frozen=True)
class EvalSource:
    """One benchmark's original file, ``{base_url}/{repo}/{commit}/{path}``, and the rows it must hold."""

    name: str  # the built-in benchmark it becomes (BUILTIN_BENCHMARKS key)
    repo: str
    commit: str
    path: str
    rows: int
    license: str

    def url(self, base_url: str | None = None) -> str:
        return f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


_NEMO_SKILLS = ("NVIDIA-NeMo/Skills", "8b18f3992854bcb668095228a146e214c567b370")
_SIMPLERL = ("hkust-nlp/simpleRL-reason", "cf1c7858bfc145a27aa733e75d930d34f0d318a6")
SOURCES: dict[str, EvalSource] = {
    "aime24": EvalSource("aime24", *_NEMO_SKILLS, "nemo_skills/dataset/aime24/test.txt", 30, "Apache-2.0"),
    "aime25": EvalSource("aime25", *_NEMO_SKILLS, "nemo_skills/dataset/aime25/test.txt", 30, "Apache-2.0"),
    "math500": EvalSource("math500", *_SIMPLERL, "examples/simplelr_math_eval/data/math500/test.jsonl", 500, "MIT"),
    "amc23": EvalSource("amc23", *_SIMPLERL, "examples/simplelr_math_eval/data/amc23/test.jsonl", 40, "MIT"),
}


class FetchError(RuntimeError):
    """A set could not be downloaded or failed its checks; the message names the source and its URL."""


def fetch_eval_sets(names: Sequence[str], to: str | os.PathLike, base_url: str | None = None,
                    timeout_s: float = TIMEOUT_S) -> dict[str, Path]:
    """Download, convert and check the named sets, then move them into ``to`` (all or none).

    Returns the written file of each name. Raises FetchError (``to`` unchanged) when a name is
    unknown, a download fails or is cut off, or a file has the wrong row count or a bad row.
    """
    sources = _sources(names)
    to = Path(to).expanduser().resolve()
    if to.exists() and not to.is_dir():
        raise FetchError(f"--to {to} exists and is not a directory; name a directory for the files.")
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}.fetch-"))
    try:
        for source in sources:
            _stage(source, staging, base_url, timeout_s)
        to.mkdir(exist_ok=True)
        written = {}
        for source in sources:
            file_name = BUILTIN_BENCHMARKS[source.name].file_name
            os.replace(staging / file_name, to / file_name)
            written[source.name] = to / file_name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sources(names: Sequence[str]) -> list[EvalSource]:
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        what = f"unknown evaluation set(s) {unknown}" if unknown else "no evaluation set named"
        raise FetchError(f"{what}: name one or more of {list(SOURCES)}.")
    return [SOURCES[n] for n in dict.fromkeys(names)]  # each once, in the order given


def _stage(source: EvalSource, staging: Path, base_url: str | None, timeout_s: float) -> None:
    """Download one source into ``staging/<name>.jsonl`` and check it with the built-in loader."""
    url = source.url(base_url)
    logger.info("%s: downloading %s", source.name, url)
    rows = _parse_jsonl(source, url, download(source.name, url, timeout_s))
    if len(rows) != source.rows:
        raise FetchError(f"{source.name}: {url} has {len(rows)} rows, expected {source.rows}; the download is "
                         "incomplete or the file there is not the pinned one.")
    spec = BUILTIN_BENCHMARKS[source.name]
    (staging / spec.file_name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    try:
        load_benchmark(spec, str(staging))
    except BenchmarkError as exc:
        raise FetchError(f"{source.name}: {url} failed the {source.name} checks: {exc}") from None


def download(name: str, url: str, timeout_s: float = TIMEOUT_S) -> bytes:
    """The whole body at ``url``; FetchError naming ``name`` on an HTTP error, a cut-off body or no connection."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{name}: download failed: HTTP {exc.code} {exc.reason} from {url}") from None
    except http.client.IncompleteRead as exc:
        raise FetchError(f"{name}: the download from {url} was cut off after {len(exc.partial)} bytes "
                         f"({exc.expected} more expected); try again.") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{name}: cannot download {url}: {reason}") from None


def _parse_jsonl(source: EvalSource, url: str, body: bytes) -> list[dict]:
    """The rows of a JSON Lines body (blank lines skipped); errors name the source and the line."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{source.name}: {url} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FetchError(f"{source.name}: {url}, line {lineno} is not valid JSON ({exc.msg}); the download "
                             "may be cut off.") from None
        if not isinstance(row, dict):
            raise FetchError(f"{source.name}: {url}, line {lineno} is a {type(row).__name__}, not an object.")
        rows.append(row)
    return rows


def run_fetch_command(names: Sequence[str], to: str, base_url: str | None = None,
                      stdout: TextIO | None = None) -> int:
    """``igrpo data fetch``: fetch, then print where the files are and how to use them (exit 0, or 2 + one line)."""
    out = stdout or sys.stdout
    try:
        written = fetch_eval_sets(names, to, base_url)
    except FetchError as exc:
        logger.debug("igrpo data fetch failed", exc_info=True)
        sys.stderr.write(f"igrpo data fetch: {str(exc).rstrip('.')}. Nothing was written to {to}.\n")
        return 2
    folder = next(iter(written.values())).parent
    for name, path in written.items():
        out.write(f"{name:8s} {SOURCES[name].rows:4d} rows  {path}  ({SOURCES[name].license}, "
                  f"{SOURCES[name].repo}@{SOURCES[name].commit[:8]})\n")
    out.write(f"\nThe built-in benchmarks read this folder once evaluation.data_dir points at it, one of:\n"
              f"  igrpo eval RECIPE evaluation.data_dir={folder}   # an override\n"
              f"  evaluation: {{data_dir: {folder}}}   # in the recipe YAML\n"
              f"  export {DATA_DIR_ENV}={folder}   # read when evaluation.data_dir is null\n")
    return 0
