"""Bad data files are refused by `sweep run` before anything is written: exit 2, `error: FILE: WHAT`, no traceback.

Also what must be read rather than refused: UTF-8 with a byte-order mark, UTF-16 and UTF-32 with theirs,
numbers and booleans in text columns.
"""

import codecs
import gzip
import json
import os
import signal

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import ASSETS, assert_refused, listing
from lora_sweep.cli import app
from lora_sweep.config import ConfigError, DataConfig, load_config
from lora_sweep.data import load_examples, read_table, to_examples
from lora_sweep.generate import examples_from_file

ROWS = [{"instruction": f"Say {i}.", "response": str(i)} for i in range(6)]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS)
CSV = "instruction,response\n" + "".join(f"{r['instruction']},{r['response']}\n" for r in ROWS)


def _file(tmp_path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _parquet(tmp_path, name: str, frame: pd.DataFrame) -> str:
    frame.to_parquet(tmp_path / name)
    return str(tmp_path / name)


def _cut_parquet(tmp_path) -> str:
    _parquet(tmp_path, "whole.parquet", pd.DataFrame(ROWS))
    whole = (tmp_path / "whole.parquet").read_bytes()
    return _file(tmp_path, "cut.parquet", whole[: len(whole) // 2])


def _symlink_loop(tmp_path) -> str:
    os.symlink(tmp_path / "b.jsonl", tmp_path / "a.jsonl")
    os.symlink(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    return str(tmp_path / "a.jsonl")


def _folder(tmp_path) -> str:
    (tmp_path / "rows.jsonl").mkdir()
    return str(tmp_path / "rows.jsonl")


def _fifo(tmp_path) -> str:
    os.mkfifo(tmp_path / "pipe.jsonl")  # reading it would wait for a writer forever
    return str(tmp_path / "pipe.jsonl")


def _unreadable(tmp_path) -> str:
    path = _file(tmp_path, "secret.jsonl", JSONL)
    os.chmod(path, 0)
    return path


def _with(rows_changed: dict[int, dict]) -> str:
    rows = [rows_changed.get(i, row) for i, row in enumerate(ROWS)]
    return "".join(json.dumps(row) + "\n" for row in rows)


def _files(make):
    """A change that points `data.files` at the file `make(tmp_path)` writes."""
    return lambda raw, tmp: raw["data"].update(files=[make(tmp)])


def _split_files(val):
    def change(raw, tmp):
        train = _file(tmp, "train.jsonl", JSONL)
        test = _file(tmp, "test.jsonl", _with({i: {"instruction": f"Ask {i}.", "response": "x"} for i in range(6)}))
        raw["data"] = {"split_files": {"train": train, "val": val(tmp), "test": test}, "max_length": 160}
    return change


LONG = {"question": "x" * 200, "meta": {"source": "y" * 200}}

# (what to change, text the output must contain: the file's name, then the field and the rule)
CASES = {
    # 1. nothing to read
    "empty JSONL (0 bytes)": (_files(lambda t: _file(t, "empty.jsonl", b"")), "empty.jsonl: `data.files`: no rows: the file is empty (0 bytes)"),
    "empty CSV (0 bytes)": (_files(lambda t: _file(t, "empty.csv", b"")), "empty.csv: `data.files`: no rows: the file is empty (0 bytes)"),
    "empty Parquet (0 bytes)": (_files(lambda t: _file(t, "empty.parquet", b"")), "empty.parquet: `data.files`: no rows: the file is empty (0 bytes)"),
    "JSONL of blank lines only": (_files(lambda t: _file(t, "blank.jsonl", "\n  \n\r\n")), "blank.jsonl: `data.files`: no rows: the file holds only blank lines"),
    "CSV of blank lines only": (_files(lambda t: _file(t, "blank.csv", "\n\n")), "blank.csv: `data.files`: no rows: the file holds only blank lines"),
    "CSV of a header only": (_files(lambda t: _file(t, "header.csv", "instruction,response\n")), 'header.csv: `data.files`: no rows: the file holds column names ["instruction", "response"] but no data'),
    "Parquet with no rows": (_files(lambda t: _parquet(t, "none.parquet", pd.DataFrame(ROWS).head(0))), 'none.parquet: `data.files`: no rows: the file holds column names ["instruction", "response"] but no data'),
    "an empty val split file": (_split_files(lambda t: _file(t, "val.jsonl", "\n")), "val.jsonl: `data.split_files.val`: no rows: the file holds only blank lines"),
    # 2. CSV the parser refuses
    "CSV row with more fields than the header": (_files(lambda t: _file(t, "ragged.csv", CSV + "Say 6.,6,extra\n")), "ragged.csv: `data.files`: not valid CSV: line 8 has 3 fields, but the header has 2"),
    "CSV with an unterminated quote": (_files(lambda t: _file(t, "quote.csv", CSV + '"Say 6.,6\nSay 7.,7\n')), "quote.csv: `data.files`: not valid CSV: the quote opened on line 8 is never closed"),
    # 3. Parquet that is not
    "Parquet of random bytes": (_files(lambda t: _file(t, "noise.parquet", bytes(range(256)) * 4)), "noise.parquet: `data.files`: not a readable Parquet file (Parquet magic bytes not found in footer)"),
    "Parquet cut short": (_files(_cut_parquet), "cut.parquet: `data.files`: not a readable Parquet file"),
    "CSV text named .parquet": (_files(lambda t: _file(t, "text.parquet", CSV)), "text.parquet: `data.files`: not a readable Parquet file"),
    # 4. not UTF-8
    "latin-1 JSONL": (_files(lambda t: _file(t, "latin1.jsonl", JSONL.replace("Say 1.", "Caf\xe9").encode("latin-1"))), "latin1.jsonl: `data.files`: not UTF-8 text (byte 0xe9 at offset 63, line 2); save it as UTF-8"),
    "latin-1 CSV": (_files(lambda t: _file(t, "latin1.csv", CSV.replace("Say 0.", "Caf\xe9").encode("latin-1"))), "latin1.csv: `data.files`: not UTF-8 text (byte 0xe9 at offset 24, line 2); save it as UTF-8"),
    "UTF-16 without a byte-order mark": (_files(lambda t: _file(t, "utf16.jsonl", JSONL.encode("utf-16-le"))), "utf16.jsonl: `data.files`: not UTF-8 text (byte 0x00 at offset 1: UTF-16 without a byte-order mark, or a binary file)"),
    "UTF-16 byte-order mark, then a cut-off character": (_files(lambda t: _file(t, "odd.jsonl", JSONL.encode("utf-16") + b"\x00")), "odd.jsonl: `data.files`: not valid UTF-16 text, though it starts with its byte-order mark"),
    "a gzip file named .jsonl": (_files(lambda t: _file(t, "packed.jsonl", gzip.compress(JSONL.encode(), mtime=0))), "packed.jsonl: `data.files`: not UTF-8 text (byte 0x8b at offset 1, line 1)"),
    # 5. not a regular file
    "a symlink loop": (_files(_symlink_loop), "a.jsonl: `data.files`: cannot be read: Too many levels of symbolic links"),
    "a folder": (_files(_folder), "rows.jsonl: `data.files`: is a folder, not a regular file"),
    "a FIFO": (_files(_fifo), "pipe.jsonl: `data.files`: is a named pipe (FIFO), not a regular file"),
    "an unreadable file": (_files(_unreadable), "secret.jsonl: `data.files`: cannot be read: Permission denied"),
    "a symlink to nothing": (_files(lambda t: (os.symlink(t / "gone.jsonl", t / "link.jsonl"), str(t / "link.jsonl"))[1]), "(data): `data.files`: file not found:"),
    # 6. no text where text belongs
    "instruction is a list": (_files(lambda t: _file(t, "list.jsonl", _with({2: {"instruction": ["Say", "2."], "response": "2"}}))), 'list.jsonl: `data.columns.instruction` (column \'instruction\'): line 3 holds a list, not text: ["Say", "2."] (1 of 6 rows hold a list or dict'),
    "response is a dict in two rows": (_files(lambda t: _file(t, "dict.jsonl", _with({1: {"instruction": "a", "response": {"text": "b"}}, 4: {"instruction": "c", "response": {}}}))), 'dict.jsonl: `data.columns.response` (column \'response\'): line 2 holds a dict, not text: {"text": "b"} (2 of 6 rows'),
    "a long dict is cut short": (_files(lambda t: _file(t, "long.jsonl", _with({0: {"instruction": LONG, "response": "0"}}))), 'holds a dict, not text: {"question": "' + "x" * 66 + '... (440 characters) (1 of 6 rows'),
    "system is a list in Parquet": (_files(lambda t: _parquet(t, "nested.parquet", pd.DataFrame([{**r, "system": ["be", "brief"]} for r in ROWS]))), "nested.parquet: `data.columns.system` (column 'system'): row 1 holds a list, not text: [\"be\", \"brief\"] (6 of 6 rows"),
    # 7. one column for two fields (a config problem, found before any file is read)
    "a column mapped twice": (lambda raw, tmp: raw["data"].update(columns={"instruction": "text", "response": "text"}), "sweep.yaml: `data.columns`: `instruction` and `response` both read column 'text'; map each to a column of its own"),
    "instruction mapped to input's column": (lambda raw, tmp: raw["data"].update(columns={"instruction": "input"}), "`data.columns`: `instruction` and `input` both read column 'input'; set `input: null` if the file has no input column"),
}


def _blocked(signum, frame):
    raise TimeoutError("`sweep run` blocked: did it open the FIFO?")  # a read of a FIFO waits for a writer forever


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused_cleanly_and_nothing_is_written(case, raw_config, write_config, tmp_path):
    if case == "an unreadable file" and os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode")
    change, expected = CASES[case]
    change(raw_config, tmp_path)
    config_path = write_config(raw_config)
    before = listing(tmp_path)
    previous = signal.signal(signal.SIGALRM, _blocked)
    signal.alarm(20)
    try:
        result = CliRunner().invoke(app, ["run", str(config_path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_refused(result, expected, before, tmp_path)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be-bom", "utf-32"])
def test_a_file_with_a_byte_order_mark_reads_like_utf8(encoding, tmp_path):
    def encode(text: str) -> bytes:
        if encoding == "utf-16-be-bom":
            return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
        return text.encode(encoding)

    text = (ASSETS / "instructions.jsonl").read_text(encoding="utf-8")
    (tmp_path / "d.jsonl").write_bytes(encode(text))
    (tmp_path / "d.csv").write_bytes(encode(pd.read_json(ASSETS / "instructions.jsonl", lines=True).to_csv(index=False)))
    expected = load_examples(DataConfig(files=[str(ASSETS / "instructions.jsonl")]), seed=0)
    for name in ("d.jsonl", "d.csv"):
        assert load_examples(DataConfig(files=[str(tmp_path / name)]), seed=0) == expected, name


def test_numbers_and_booleans_in_text_columns_are_read_as_their_text(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"instruction": 7, "response": 1}\n{"instruction": "b", "response": 2.5}\n'
                    '{"instruction": "c", "response": true}\n{"instruction": "d", "response": null}\n')
    examples, dropped = to_examples(read_table(path), DataConfig(files=[str(path)]), str(path))
    assert [(e.instruction, e.response) for e in examples] == [("7", "1"), ("b", "2.5"), ("c", "true")]
    assert dropped == 1  # null is empty, dropped and counted like ""
    parquet = tmp_path / "n.parquet"
    pd.DataFrame({"instruction": ["a", "b"], "response": pd.array([1, None], dtype="Int64")}).to_parquet(parquet)
    examples, dropped = to_examples(read_table(parquet), DataConfig(files=[str(parquet)]), str(parquet))
    assert [(e.instruction, e.response) for e in examples] == [("a", "1")] and dropped == 1  # "1", not "1.0"


@pytest.fixture
def sweep_config(raw_config, write_config):
    return load_config(write_config(raw_config))


def test_prompts_file_in_utf16_with_its_byte_order_mark_is_read(sweep_config, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes('{"instruction": "Répète le mot.", "input": "abc"}\n'.encode("utf-16"))
    [example] = examples_from_file(path, sweep_config)
    assert (example.instruction, example.input) == ("Répète le mot.", "abc")


PROMPT_FILES = {
    "latin-1": (lambda t: _file(t, "p.jsonl", '{"instruction": "Caf\xe9"}\n'.encode("latin-1")), "`--file`: not UTF-8 text (byte 0xe9 at offset 20, line 1); save it as UTF-8"),
    "empty": (lambda t: _file(t, "p.jsonl", b""), "`--file`: no rows: the file is empty (0 bytes)"),
    "blank lines only": (lambda t: _file(t, "p.csv", "\n\n"), "`--file`: no rows: the file holds only blank lines"),
    "a folder": (_folder, "`--file`: is a folder, not a regular file"),
    "a FIFO": (_fifo, "`--file`: is a named pipe (FIFO), not a regular file"),
    "a list for an instruction": (lambda t: _file(t, "p.jsonl", '{"instruction": "a"}\n{"instruction": ["b"]}\n'), "`data.columns.instruction` (column 'instruction'): line 2 holds a list"),
}


@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_bad_prompts_file_is_refused_naming_it(case, sweep_config, tmp_path):
    make, expected = PROMPT_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as refused:
        examples_from_file(path, sweep_config)
    assert refused.value.source == str(path)
    assert len(refused.value.problems) == 1 and expected in refused.value.problems[0], refused.value.problems


def test_a_file_that_cannot_be_opened_is_refused_naming_the_reason(tmp_path, monkeypatch):
    """The same path as chmod 000 for a user other than root (tests run as root here, who may read anything)."""
    path = tmp_path / "secret.jsonl"
    path.write_text(JSONL)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(ConfigError) as refused:
        read_table(path)
    assert refused.value.source == str(path)
    assert refused.value.problems == ["`data.files`: cannot be read: Permission denied"]
