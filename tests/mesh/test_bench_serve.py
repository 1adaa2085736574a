"""`exegpt bench serve`'s report: rows over runs, ratios, the JSON rows (no server is started)."""

import json
import tempfile

from services.bench.serve import LLAMA, OURS, Cell, library_links, print_table, start_failure, summarize, write_json


def _cell(server: str, concurrency: int, tok_s: float, step: float | None = 0.02) -> Cell:
    served = None if step is None else step * 1.1
    return Cell(server, concurrency, tok_s, 0.3, 0.025, 500_000_000, 0.03, served, step)


def test_rows_keep_every_run_and_the_json_has_one_object_per_server_and_concurrency(tmp_path, capsys):
    cells = [
        _cell(OURS, 1, 30.0),
        _cell(LLAMA, 1, 60.0, None),
        _cell(OURS, 1, 40.0),
        _cell(LLAMA, 1, 80.0, None),
        _cell(OURS, 8, 90.0),
    ]
    rows = summarize(cells, [1, 8])
    assert [(r.server, r.concurrency, len(r.runs)) for r in rows] == [(OURS, 1, 2), (LLAMA, 1, 2), (OURS, 8, 1)]
    assert rows[0].median("output_tok_s") == 35.0
    assert rows[0].spread("output_tok_s") == "30.0–40.0"
    print_table(rows, _Args(), "llama-server")
    table = capsys.readouterr().out
    assert "| exegpt serve | 1 | 30.0–40.0 |" in table and "0.50–0.50 |" in table  # ours / llama.cpp, run by run

    write_json(tmp_path / "out.json", rows, None)
    objects = json.loads((tmp_path / "out.json").read_text())
    keys = {"server", "concurrency", "output_tok_s", "ttft_p50_s", "itl_p50_s", "rss_peak_bytes"}
    assert all(keys <= set(o) for o in objects)
    ours = [o for o in objects if o["server"] == OURS]
    assert [o["concurrency"] for o in ours] == [1, 8] and ours[0]["engine_step_s"] == 0.02
    assert {(o["server"], o["concurrency"], o.get("installed")) for o in objects if o["output_tok_s"] is None} == {
        (LLAMA, 1, False),
        (LLAMA, 8, False),
    }


class _Args:
    model, threads, input_tokens, output_tokens, runs = "smollm2", 2, 128, 64, 2


def test_the_packages_missing_library_links_are_made_so_its_llama_server_can_start(tmp_path):
    (tmp_path / "libllama-common.so.0.6.0").write_bytes(b"")
    (tmp_path / "_symlinks.json").write_text(
        json.dumps(
            {
                "libllama-common.so": "libllama-common.so.0",  # a link to a link listed after it
                "libllama-common.so.0": "libllama-common.so.0.6.0",
                "libmissing.so.0": "libmissing.so.0.1.0",
            }
        )
    )  # its target is not installed: left alone
    made = library_links(tmp_path)
    assert sorted(made) == ["libllama-common.so", "libllama-common.so.0"]
    assert (tmp_path / "libllama-common.so").resolve() == (tmp_path / "libllama-common.so.0.6.0").resolve()
    assert not (tmp_path / "libmissing.so.0").is_symlink()
    assert library_links(tmp_path) == []  # made once


def test_a_server_that_exits_at_start_is_reported_with_its_status_and_last_error_line():
    with tempfile.TemporaryFile() as log:
        log.write(b"loading...\nerror while loading shared libraries: libllama-common.so.0\n\n")
        assert start_failure(127, log) == (
            "exited with status 127 before it was ready: error while loading shared libraries: libllama-common.so.0"
        )
    with tempfile.TemporaryFile() as log:
        assert start_failure(None, log).startswith("did not become ready within")
