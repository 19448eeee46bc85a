"""``igrpo data fetch`` end to end against a local HTTP server serving the sources' original files.

The server (127.0.0.1, started here) lays files out as raw.githubusercontent.com does,
``/<owner>/<repo>/<commit>/<path>``, and the command reaches it through ``--base-url``. It serves the
public files byte for byte when they are found (``eval_data_path()``: they are copies of the pinned
originals, JSON Lines, the AIME ones named ``test.txt`` upstream); on a fresh clone it serves
generated rows in the same formats and numbers (30/30/500/40), so these tests run everywhere.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from igrpo_megatron.cli import main
from igrpo_megatron.config.evaluation import EvaluationConfig
from igrpo_megatron.evaluation.benchmarks import load_benchmarks
from tests.conftest import eval_data_missing_reason, eval_data_path

NAMES = ("aime24", "aime25", "math500", "amc23")
ROWS = {"aime24": 30, "aime25": 30, "math500": 500, "amc23": 40}
# Written out from shared/data/eval/SOURCES.md (repository, file, commit), not read from the code's table.
NEMO = "/NVIDIA-NeMo/Skills/8b18f3992854bcb668095228a146e214c567b370/nemo_skills/dataset"
SIMPLERL = "/hkust-nlp/simpleRL-reason/cf1c7858bfc145a27aa733e75d930d34f0d318a6/examples/simplelr_math_eval/data"
PATHS = {"aime24": f"{NEMO}/aime24/test.txt", "aime25": f"{NEMO}/aime25/test.txt",
         "math500": f"{SIMPLERL}/math500/test.jsonl", "amc23": f"{SIMPLERL}/amc23/test.jsonl"}


def _generated_rows(name: str) -> list[dict]:
    """Rows in the source's own fields and types (AIME answers are strings, AMC answers floats)."""
    n = ROWS[name]
    if name.startswith("aime"):
        return [{"id": f"{name}-{i}", "problem": f"Find {i} + 7.", "expected_answer": f"{i + 7:03d}",
                 "reference_solution": f"$\\boxed{{{i + 7}}}$"} for i in range(n)]
    if name == "math500":
        return [{"problem": f"Halve {i + 1}.", "solution": "...", "answer": f"\\frac{{{i + 1}}}{{2}}",
                 "subject": "Algebra", "level": 1 + i % 5, "unique_id": f"test/algebra/{i}.json"} for i in range(n)]
    return [{"id": i, "problem": f"What is {i} + 27?", "answer": float(i + 27), "url": "https://example.org",
             "question": f"What is {i} + 27?"} for i in range(n)]


def _original_files() -> dict[str, bytes]:
    """Each source's body: the public file when present, else generated rows of the same count."""
    if eval_data_missing_reason() is None:
        return {name: (eval_data_path() / f"{name}.jsonl").read_bytes() for name in NAMES}
    return {name: "".join(json.dumps(r) + "\n" for r in _generated_rows(name)).encode() for name in NAMES}


class _Handler(BaseHTTPRequestHandler):
    """GET of a routed path: its body, or (mode 'cut') half of it under the full Content-Length."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        body, mode = self.server.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy from the environment would not reach it
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {PATHS[name]: (body, "ok") for name, body in _original_files().items()}
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_fetch_writes_four_checked_files_the_builtins_read(server, tmp_path, capsys):
    to = tmp_path / "eval"
    code = main(["data", "fetch", *NAMES, "--to", str(to), "--base-url", _url(server) + "/"])
    out = capsys.readouterr().out
    assert code == 0
    assert server.requests == [PATHS[n] for n in NAMES]  # the pinned commits and paths of SOURCES.md
    assert sorted(p.name for p in to.iterdir()) == sorted(f"{n}.jsonl" for n in NAMES)
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # the staging folder is gone
    # The built-in loaders read the folder through evaluation.data_dir: every row, answers normalised.
    cfg = EvaluationConfig(data_dir=str(to))
    benches = {b.name: b for b in load_benchmarks(list(NAMES), cfg)}
    assert {n: len(b) for n, b in benches.items()} == {"aime24": 30, "aime25": 30, "math500": 500, "amc23": 40}
    for name in NAMES:
        served = [json.loads(line) for line in server.routes[PATHS[name]][0].decode().splitlines()]
        assert [json.loads(line) for line in (to / f"{name}.jsonl").read_text().splitlines()] == served
        field = "expected_answer" if name.startswith("aime") else "answer"
        raw = [r[field] for r in served]
        golds = [p.gold for p in benches[name].problems]
        if name == "math500":
            assert golds == raw  # LaTeX kept as written
        else:  # AIME '073' -> '73'; AMC 27.0 -> '27'
            assert all(isinstance(v, float) for v in raw) if name == "amc23" else all(isinstance(v, str) for v in raw)
            assert golds == [str(int(float(v))) for v in raw]
    assert f"evaluation.data_dir={to}" in out and f"IGRPO_EVAL_DATA_DIR={to}" in out
    assert f"math500   500 rows  {to / 'math500.jsonl'}" in out


@pytest.mark.parametrize("fault, message", [
    ("404", r"math500: download failed: HTTP 404 Not Found from http://127\.0\.0\.1:\d+/hkust-nlp/"),
    ("cut", r"math500: the download from http://\S+/math500/test\.jsonl was cut off after \d+ bytes"),
    ("short", r"math500: http://\S+/math500/test\.jsonl has 250 rows, expected 500"),
    ("bad_answer", r"aime25: .* failed the aime25 checks: .*aime25\.jsonl, (row|line) 3, field 'expected_answer': "
                   r"answer 'twelve' is not a whole number"),
])
def test_a_failed_source_is_named_and_nothing_is_written(server, tmp_path, capsys, fault, message):
    body = server.routes[PATHS["math500"]][0]
    if fault == "404":
        del server.routes[PATHS["math500"]]
    elif fault == "cut":  # the connection closes half-way through the announced Content-Length
        server.routes[PATHS["math500"]] = (body, "cut")
    elif fault == "short":  # a complete response that holds only the first 250 rows
        server.routes[PATHS["math500"]] = ("".join(body.decode().splitlines(keepends=True)[:250]).encode(), "ok")
    else:
        rows = [json.loads(line) for line in server.routes[PATHS["aime25"]][0].decode().splitlines()]
        rows[2]["expected_answer"] = "twelve"
        server.routes[PATHS["aime25"]] = ("".join(json.dumps(r) + "\n" for r in rows).encode(), "ok")
    to = tmp_path / "eval"
    code = main(["data", "fetch", *NAMES, "--to", str(to), "--base-url", _url(server)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("igrpo data fetch: ")
    assert re.search(message, err), err
    assert not to.exists()  # aime24 (and aime25) downloaded fine, yet nothing reached --to
    assert list(tmp_path.iterdir()) == []  # no staging folder left beside it


def test_existing_folder_is_untouched_on_failure_and_updated_on_success(server, tmp_path, capsys):
    to = tmp_path / "eval"
    to.mkdir()
    (to / "aime24.jsonl").write_text("old\n")
    (to / "notes.txt").write_text("mine\n")
    del server.routes[PATHS["amc23"]]
    assert main(["data", "fetch", "aime24", "amc23", "--to", str(to), "--base-url", _url(server)]) == 2
    assert "amc23: download failed: HTTP 404" in capsys.readouterr().err
    assert (to / "aime24.jsonl").read_text() == "old\n" and sorted(p.name for p in to.iterdir()) == [
        "aime24.jsonl", "notes.txt"]
    assert main(["data", "fetch", "aime24", "aime24", "--to", str(to), "--base-url", _url(server)]) == 0
    assert len((to / "aime24.jsonl").read_text().splitlines()) == 30 and (to / "notes.txt").read_text() == "mine\n"
    assert server.requests.count(PATHS["aime24"]) == 2  # once per command: a repeated name is fetched once


def test_unknown_name_and_unreachable_mirror(tmp_path, capsys):
    to = tmp_path / "eval"
    assert main(["data", "fetch", "aime23", "--to", str(to)]) == 2
    assert "unknown evaluation set(s) ['aime23']: name one or more of ['aime24', 'aime25', 'math500', 'amc23']" \
        in capsys.readouterr().err
    # A port nothing listens on (bound, never accepted): a connection error naming the source.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["data", "fetch", "amc23", "--to", str(to), "--base-url", f"http://127.0.0.1:{port}"]) == 2
    assert f"amc23: cannot download http://127.0.0.1:{port}/hkust-nlp/" in capsys.readouterr().err
    assert not to.exists()


def test_default_urls_are_the_pinned_raw_github_files():
    from igrpo_megatron.evaluation.fetch import SOURCES

    assert {n: s.url() for n, s in SOURCES.items()} == {n: "https://raw.githubusercontent.com" + p
                                                         for n, p in PATHS.items()}
    assert {n: s.rows for n, s in SOURCES.items()} == ROWS
