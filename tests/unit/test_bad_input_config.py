"""Bad configs, overrides and environment are refused by `sweep run` and `sweep plan` before anything runs or is
written: exit 2, one to three `error:` lines naming the field, the value and the rule, no traceback."""

from __future__ import annotations


import pytest
import yaml
from typer.testing import CliRunner

from conftest import assert_refused, free_port, listing, refused_case
from lora_sweep.cli import app


def _set(section: str, **values):
    def change(raw: dict, tmp) -> None:
        if section:
            raw.setdefault(section, {}).update(values)
        else:
            raw.update(values)
    return change


# (what to change in the config dict, expected text in the output)
CASES = {
    "trust_remote_code 'yes'": (_set("model", trust_remote_code="yes"), "`model.trust_remote_code`: Input should be a valid boolean (got 'yes')"),
    "trust_remote_code 1": (_set("model", trust_remote_code=1), "`model.trust_remote_code`: Input should be a valid boolean (got 1)"),
    "trust_remote_code 'on'": (_set("model", trust_remote_code="on"), "`model.trust_remote_code`: Input should be a valid boolean (got 'on')"),
    "use_dora 'true' as a string": (_set("lora", use_dora="true"), "`lora.use_dora`: Input should be a valid boolean"),
    "batch_size true": (_set("training", batch_size=True), "`training.batch_size`: Input should be a valid integer (got True)"),
    "max_steps 6.5": (_set("training", max_steps=6.5), "`training.max_steps`: Input should be a valid integer (got 6.5)"),
    "learning_rate true": (_set("training", learning_rate=True), "`training.learning_rate`: Input should be a number, not a boolean"),
    "learning_rate inf": (_set("training", learning_rate=float("inf")), "`training.learning_rate`: Input should be a finite number (got inf)"),
    "dropout nan": (_set("lora", dropout=float("nan")), "`lora.dropout`: Input should be a finite number (got nan)"),
    "resources.gpu inf": (_set("resources", gpu=float("inf")), "`resources.gpu`: Input should be a finite number (got inf)"),
    "ray.num_gpus inf": (_set("ray", num_gpus=float("inf")), "`ray.num_gpus`: Input should be a finite number (got inf)"),
    "budget nan": (_set("budget", wall_hours=float("nan")), "`budget.wall_hours`: Input should be a finite number"),
    "seed negative": (_set("", seed=-1), "`seed`: Input should be greater than or equal to 0 (got -1)"),
    "seed above 2^32-1": (_set("", seed=2**32), "`seed`: Input should be less than or equal to 4294967295 (got 4294967296)"),
    "reduction_factor near 1": (_set("scheduler", reduction_factor=1.0000001), "scheduler.reduction_factor 1.0000001 with grace_period 3 and max_steps 6 makes 6,931,473 ASHA rungs, but at most 100"),
    "name with a slash": (_set("", name="a/b"), "`name`: String should match pattern"),
    "name '..'": (_set("", name=".."), "`name`: String should match pattern"),
    "name empty": (_set("", name=""), "`name`: String should match pattern"),
    "name of 201 characters": (_set("", name="a" * 201), "`name`: String should have at most 200 characters"),
    "storage with user info": (_set("", storage="s3://AKIAXXXX:s3cr3t@bucket/prefix"), "`storage`: must not carry credentials (user info before '@')"),
    "storage with a secret in the query": (_set("", storage="s3://bucket/p?region=x&secret_key=s3cr3t"), "`storage`: must not carry credentials (secret_key)"),
    "storage with a presigned signature": (_set("", storage="s3://bucket/p?X-Amz-Signature=s3cr3t"), "must not carry credentials (X-Amz-Signature)"),
    "storage of an unknown scheme": (_set("", storage="mock://bucket/prefix"), "`storage`: must be a URI of one of the schemes s3, gs"),
    "storage a plain path": (_set("", storage="/tmp/x"), "`storage`: must be a URI"),
    "ray.address without a port": (_set("ray", address="nohost"), "`ray.address`: must be `auto`, HOST:PORT"),
    "ray.address port 0": (_set("ray", address="127.0.0.1:0"), "`ray.address`: must be `auto`, HOST:PORT"),
    "ray.address port too big": (_set("ray", address="127.0.0.1:99999"), "`ray.address`: must be `auto`, HOST:PORT"),
    "ray.address with a path": (_set("ray", address="127.0.0.1:6379/x"), "`ray.address`: must be `auto`, HOST:PORT"),
    "ray.address nothing answers": (lambda raw, tmp: raw["ray"].update(address=f"127.0.0.1:{free_port()}"), "`ray.address`: nothing answers at 127.0.0.1:"),
    "search.metric unknown": (_set("search", metric="accuracy"), "`search.metric`: must be one the trainable reports"),
    "a long bad value is cut short": (_set("training", batch_size="x" * 5000), "... (5,002 characters)"),
    "a NUL in a data path": (lambda raw, tmp: raw["data"].update(files=[raw["data"]["files"][0] + "\0x"]), "`data.files.0`: must not hold control characters"),
    "a newline in model.path": (lambda raw, tmp: raw["model"].update(path=raw["model"]["path"] + "\nerror: forged"), "`model.path`: must not hold control characters"),
    "an output_dir that loops": (lambda raw, tmp: ((tmp / "loop").symlink_to(tmp / "loop"), raw.update(output_dir=str(tmp / "loop" / "x"))), "`output_dir`: cannot be resolved to a folder"),
    "an output_dir of 5000 characters": (_set("", output_dir="d" * 5000), "`output_dir`: is 5,000 characters long"),
    "resources.cpu finer than Ray counts": (_set("resources", cpu=0.00001), "`resources.cpu`: Ray counts resources in steps of 0.0001, but got 1e-05"),
    "resources.workers 0": (_set("resources", workers=0), "`resources.workers`: Input should be greater than or equal to 1 (got 0)"),
    "workers sharing a GPU": (_set("resources", workers=2, gpu=0.5), "`resources.workers`: 2 with resources.gpu 0.5, but data-parallel workers cannot share a GPU"),
    "workers of several GPUs each": (_set("resources", workers=2, gpu=2), "`resources.workers`: 2 with resources.gpu 2, but a data-parallel worker trains on one GPU"),
    "resources.gpu finer than Ray counts": (_set("resources", gpu=1e-9), "`resources.gpu`: Ray counts resources in steps of 0.0001"),
    "a ray.address host of 3000 characters": (_set("ray", address="h" * 3000 + ":6379"), "`ray.address`: must be `auto`, HOST:PORT"),
    "a password in ray.address": (_set("ray", address="ray://user:s3cr3t@127.0.0.1:10001"), "`ray.address`: must be `auto`"),
    "a URL-encoded secret in storage": (_set("", storage="s3://bucket/p?secret_key%3Ds3cr3t"), "must not carry credentials"),
    "a secret in a storage fragment": (_set("", storage="s3://bucket/p#secret_key=s3cr3t"), "`storage`: must not hold a fragment"),
    "a password in a storage option's URL": (_set("", storage="s3://bucket/p?endpoint_override=http://u:s3cr3t@host"), "must not carry credentials"),
    "storage without a bucket": (_set("", storage="s3://"), "`storage`: must name a bucket or container after s3://"),
    "target_modules as one comma string": (_set("lora", target_modules="q_proj, v_proj"), "`lora.target_modules`: Input should be 'attention', 'mlp' or 'all-linear'"),
    "lora.rank beyond 65536": (_set("lora", rank=10**23), "`lora.rank`: Input should be less than or equal to 65536"),
    "max_steps of 26 digits": (_set("training", max_steps=10**25), "`training.max_steps`: Input should be less than or equal to 100000000"),
    "a space's int bound of 1e300": (lambda raw, tmp: raw["search"].update(space=None, parameters={"lora.rank": {"type": "int", "low": 1, "high": 1e300}}), "`lora.rank`.high: must be at most 2^53 in size"),
    "an unknown key of 5000 characters": (lambda raw, tmp: raw.update({"k" * 5000: 1}), "unknown key"),
    "JSONL nested 100,000 deep": (lambda raw, tmp: (tmp.joinpath("deep.jsonl").write_text('{"instruction": "a", "response": ' + "[" * 100_000 + "]" * 100_000 + "}\n"), raw["data"].update(files=[str(tmp / "deep.jsonl")])), "deep.jsonl: line 1: JSON nested too deeply"),
    "JSONL with a 5000-digit number": (lambda raw, tmp: (tmp.joinpath("big.jsonl").write_text('{"instruction": "a", "response": ' + "7" * 5000 + "}\n"), raw["data"].update(files=[str(tmp / "big.jsonl")])), "big.jsonl: line 1: a value JSON cannot hold here"),
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_cleanly_and_nothing_is_written(case, command, raw_config, write_config, tmp_path):
    result = refused_case(command, *CASES[case], raw_config, write_config, tmp_path)
    assert "s3cr3t" not in result.output  # a credential is never printed, even by the error that refuses it
    assert "error: forged" not in result.output.splitlines()[0][:12]  # no line is forged by a value's newline
    assert not any(line.startswith("error: forged") for line in result.output.splitlines())


# Whole files and overrides: (config text or bytes, overrides, expected)
FILES = {
    "a key given twice": ("name: a\nseed: 1\nseed: 2\n", [], "key 'seed' appears twice in one mapping (lines 2 and 3)"),
    "a nested key given twice": ("training:\n  max_steps: 6\n  max_steps: 7\n", [], "key 'max_steps' appears twice"),
    "an alias bomb": ("a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                      "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", [],
                      "expands to more than 100,000 values"),
    "a recursive alias": ("a: &a [*a]\n", [], "YAML"),
    "YAML nested 3000 deep": ("extra: " + "[" * 3000 + "]" * 3000 + "\n", [], "YAML nested too deeply"),
    "a config of more than 1 MB": ("name: x\n" + "# padding\n" * 120_000, [], "bytes; a config file is a few KB"),
    "an integer of 5000 digits": ("name: x\nseed: " + "9" * 5000 + "\n", [], "an integer of 5,000 digits"),
    "an override nested 20000 deep": (None, ["data.default_system=" + "[" * 20000 + "]" * 20000], "YAML nested too deeply"),
    "a Python tag": ("name: !!python/object/apply:os.system ['echo hacked']\n", [], "could not determine a constructor"),
    "latin-1 bytes": (b"name: caf\xe9\n", [], "not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"),
    "UTF-16 without a BOM": ("name: x\n".encode("utf-16-le"), [], "holds NUL characters: UTF-16 without a byte-order mark?"),
    "a list at the top": ("- a\n- b\n", [], "the top level must be a mapping of keys, but got list"),
    "an override of broken YAML": (None, ["seed=[1"], "override 'seed=[1': the value is not valid here: YAML syntax error"),
    "an override with a Python tag": (None, ["seed=!!python/object/apply:os.system ['echo hacked']"], "could not determine a constructor"),
    "an override with an empty key part": (None, ["training..max_steps=3"], "the key before '=' must be dotted names"),
    "an override without '='": (None, ["seed"], "must look like dotted.key=value"),
    "an override of 'yes' for a bool": (None, ["model.trust_remote_code=yes"], "`model.trust_remote_code`: Input should be a valid boolean (got 'yes')"),
    "an override of .inf": (None, ["resources.gpu=.inf"], "`resources.gpu`: Input should be a finite number (got inf)"),
    "a key given twice on one line": ("training: {batch_size: 8, batch_size: 16}\n", [], "key 'batch_size' appears twice in one mapping (line 1)"),
    "credentials in a storage URI without a scheme": (None, ["storage=AKIAEXAMPLE:s3cr3t@bucket/prefix"], "`storage`: must be a URI"),
    "a storage URI that cannot be parsed": (None, ["storage=s3://AKIAEXAMPLE:s3cr3t@[bucket/prefix"], "`storage`: cannot be parsed as a URI"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_bad_config_file_or_override_is_refused_cleanly(case, raw_config, write_config, tmp_path):
    content, overrides, expected = FILES[case]
    config_path = write_config(raw_config)
    if isinstance(content, bytes):
        config_path.write_bytes(content)
    elif content is not None:
        config_path.write_text(content)
    before = listing(tmp_path)
    result = CliRunner().invoke(app, ["run", str(config_path), *overrides])
    assert_refused(result, expected, before, tmp_path)
    assert "hacked" not in result.output.replace("echo hacked", "")  # the tag was never run
    assert "s3cr3t" not in result.output and "AKIAEXAMPLE" not in result.output


MERGE_KEY_BOMB = "a0: &a0 {k0: 0, k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8, k9: 9}\n" + "".join(
    f"a{n}: &a{n} {{<<: [{', '.join([f'*a{n - 1}'] * 10)}]}}\n" for n in range(1, 9))


def test_a_merge_key_bomb_is_refused_without_expanding(write_config, raw_config, tmp_path):
    """Ten merges of ten merges, eight deep: 10**9 entries where the YAML library copies merged pairs (PyYAML
    before 6.0.4; our loader stops it past 100,000); PyYAML 6.0.4 merges each key once, so the file stays small
    and is refused as what it is, a file that is not a sweep config."""
    config_path = write_config(raw_config)
    config_path.write_text(MERGE_KEY_BOMB)
    before = listing(tmp_path)
    result = CliRunner().invoke(app, ["run", str(config_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert ("a mapping expands to more than 100,000 keys through merge keys" in result.output
            or "`name`: required field is missing" in result.output), result.output
    assert listing(tmp_path) == before


def test_a_config_in_utf16_or_utf8_with_a_bom_is_read(raw_config, write_config, tmp_path):
    text = yaml.safe_dump(raw_config)
    for codec in ("utf-16", "utf-8-sig", "utf-32"):
        path = write_config(raw_config)
        path.write_bytes(text.encode(codec))
        result = CliRunner().invoke(app, ["plan", str(path), "--json"])
        assert result.exit_code == 0, (codec, result.output)


def test_yaml_1_1_words_are_text_and_1e_4_is_a_number(raw_config, write_config):
    from lora_sweep.config import load_config

    raw_config["training"]["learning_rate"] = "1e-4"
    path = write_config(raw_config)
    path.write_text(path.read_text().replace("'1e-4'", "1e-4"))
    assert load_config(path).training.learning_rate == pytest.approx(1e-4)
    assert load_config(path, ["data.default_system=no"]).data.default_system == "no"  # YAML 1.1 made it False


@pytest.mark.parametrize("variable, value, expected", [
    ("LORA_SWEEP_STALL_AT", "nowhere", "`LORA_SWEEP_STALL_AT`: must be one of data_preparation, between_trials, export"),
    ("LORA_SWEEP_INJECT_FAULT", "boom", "`LORA_SWEEP_INJECT_FAULT`: must look like KIND@STEP"),
    ("LORA_SWEEP_TUNE_VERBOSE", "loud", "`LORA_SWEEP_TUNE_VERBOSE`: must be 0, 1, 2 or 3"),
])
def test_armed_test_hooks_with_malformed_values_are_refused(variable, value, expected, raw_config, write_config, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("LORA_SWEEP_TEST_HOOKS", "armed")
    monkeypatch.setenv(variable, value)
    config_path = write_config(raw_config)
    before = listing(tmp_path)
    assert_refused(CliRunner().invoke(app, ["run", str(config_path)]), expected, before, tmp_path)


def test_test_hooks_are_inert_unless_armed(raw_config, write_config, monkeypatch):
    from lora_sweep.testing import faults

    monkeypatch.setenv("LORA_SWEEP_STALL_AT", "export")
    monkeypatch.setenv("LORA_SWEEP_INJECT_FAULT", "exception@1")
    monkeypatch.delenv("LORA_SWEEP_TEST_HOOKS", raising=False)
    assert faults.stall_point() is None and faults.planned_fault() is None
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 0
    assert "warning: ignored: LORA_SWEEP_INJECT_FAULT, LORA_SWEEP_STALL_AT set" in result.output
    monkeypatch.setenv("LORA_SWEEP_TEST_HOOKS", "yes")
    assert_refused(CliRunner().invoke(app, ["plan", str(write_config(raw_config))]),
                   "`LORA_SWEEP_TEST_HOOKS`: must be 'armed' (tests only) or unset, but got 'yes'")
    monkeypatch.setenv("LORA_SWEEP_TEST_HOOKS", "armed")
    assert faults.stall_point() == "export" and faults.planned_fault() == ("exception", 1)


def test_yaml_1_2_integers_and_storage_uris_that_name_places(raw_config, write_config):
    from lora_sweep.config import load_config, redact_uri

    path = write_config(raw_config)
    path.write_text(path.read_text().replace("seed: 0", "seed: 010"))
    assert load_config(path).seed == 10  # YAML 1.1 read 010 as octal 8
    for uri in ("abfss://container@account.dfs.core.windows.net/sweeps", "hdfs://alice@namenode:8020/sweeps",
                "s3://bucket/p?region=us-east-1&endpoint_override=127.0.0.1:9000&scheme=http"):
        assert load_config(path, [f"storage={uri}"]).storage == uri  # user names and options, not secrets
    assert redact_uri("s3://bucket/p?region=x&secret_key=abc") == "s3://bucket/p?region=x&secret_key=***"
    assert redact_uri("KEY:SECRET@bucket/x") == "***@bucket/x"


@pytest.mark.parametrize("command", ["plan", "best", "status", "report", "resume"])
def test_a_path_beyond_the_systems_limits_is_one_error_line(command, tmp_path):
    assert_refused(CliRunner().invoke(app, [command, str(tmp_path / ("y" * 5000))]), "error: ")


def test_a_search_space_path_is_relative_to_its_config(raw_config, write_config, tmp_path):
    from lora_sweep.config import load_config

    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "mine.yaml").write_text("parameters:\n  lora.rank: {type: choice, values: [2, 4]}\n")
    (tmp_path / "configs").mkdir()
    raw_config["search"]["space"] = "../spaces/mine.yaml"
    config = load_config(write_config(raw_config, "configs/sweep.yaml"))
    assert config.search.space == str(tmp_path / "spaces" / "mine.yaml")


def test_a_row_far_beyond_max_length_is_dropped_without_tokenizing(raw_config, write_config, tmp_path):
    import json as json_module

    source = raw_config["data"]["files"][0]
    text = open(source, encoding="utf-8").read()
    huge = json_module.dumps({"instruction": "Say it.", "response": "x" * 2_000_000})
    (tmp_path / "with_huge.jsonl").write_text(text + ("" if text.endswith("\n") else "\n") + huge + "\n")
    raw_config["data"]["files"] = [str(tmp_path / "with_huge.jsonl")]
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config)), "--json"])
    assert result.exit_code == 0, result.output
    dropped = json_module.loads(result.output)["rows_dropped"]
    assert sum(v for k, v in dropped.items() if k.startswith("too_long")) == 1
