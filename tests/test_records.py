"""companion.records: a record written, read back, refused with other settings, and the
``--record`` command line dispatching to a fake recorder."""

import json

import pytest
import torch

from companion.records import check_settings, load_record, record_main, write_record

SETTINGS = {"seeds": (0, 1, 2), "lr": 1e-2, "grid": {"a": (1, 2)}}


def test_write_then_load_is_the_same_record(tmp_path):
    path = tmp_path / "runs.json"
    written = write_record(path, "a test", SETTINGS, runs=[{"seed": 0, "loss": [1.5, 0.25]}])
    assert written == {"what": "a test", "torch": torch.__version__, "settings": SETTINGS,
                       "runs": [{"seed": 0, "loss": [1.5, 0.25]}]}
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.count("\n") == 1 and ", " not in text  # compact
    loaded = load_record(path, SETTINGS, "python -m x --record y")
    assert loaded == json.loads(json.dumps(written))
    assert loaded["settings"]["seeds"] == [0, 1, 2]        # tuples come back as lists


def test_indent_writes_the_same_record_on_several_lines(tmp_path):
    path = tmp_path / "runs.json"
    write_record(path, "a test", SETTINGS, indent=1, runs=[1])
    assert path.read_text(encoding="utf-8").count("\n") > 5
    assert load_record(path, SETTINGS, "cmd")["runs"] == [1]


def test_tuple_and_list_settings_are_equal(tmp_path):
    path = tmp_path / "runs.json"
    write_record(path, "a test", {"seeds": [0, 1], "lr": 0.1})
    assert load_record(path, {"seeds": (0, 1), "lr": 0.1}, "cmd")["settings"]["lr"] == 0.1


@pytest.mark.parametrize("other", [{**SETTINGS, "lr": 2e-2}, {"seeds": (0, 1, 2)},
                                   {**SETTINGS, "seeds": (0, 1)}, {**SETTINGS, "extra": 1}])
def test_other_settings_raise_and_name_the_command(tmp_path, other):
    path = tmp_path / "runs.json"
    write_record(path, "a test", SETTINGS)
    with pytest.raises(ValueError, match=r"re-record it with python -m companion\.x --record y"):
        load_record(path, other, "python -m companion.x --record y")


def test_a_record_without_settings_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"runs": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="recorded with settings None.*re-record"):
        load_record(path, SETTINGS, "cmd")


def test_check_settings_names_where_the_record_lies():
    check_settings("ckpt.pt", {"steps": 3}, {"steps": 3}, "cmd")
    with pytest.raises(ValueError, match="ckpt.pt was recorded with .*steps.*: re-record it"):
        check_settings("ckpt.pt", {"steps": 4}, {"steps": 3}, "cmd")


def test_bad_arguments_raise_naming_them(tmp_path):
    path = tmp_path / "runs.json"
    with pytest.raises(TypeError, match="what"):
        write_record(path, 3, SETTINGS)
    with pytest.raises(TypeError, match="settings"):
        write_record(path, "a test", [("lr", 1)])
    with pytest.raises(TypeError, match="path"):
        write_record(None, "a test", SETTINGS)
    write_record(path, "a test", SETTINGS)
    with pytest.raises(TypeError, match="command"):
        load_record(path, SETTINGS, None)
    with pytest.raises(TypeError, match="settings"):
        load_record(path, None, "cmd")
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TypeError, match="record"):
        load_record(path, SETTINGS, "cmd")


class FakeRecorders:
    """Two recorders that write down how they were called."""

    def __init__(self):
        self.calls = []

    def with_log(self, path="default.json", log=print, seeds=None):
        self.calls.append(("with_log", path, seeds))
        log("logged")

    def without_log(self, path="default.json", jobs=1):
        self.calls.append(("without_log", path, jobs))

    def recorders(self):
        return {"a": self.with_log, "b": self.without_log}


def test_record_main_dispatches_with_out_and_log(capsys):
    fake = FakeRecorders()
    assert record_main("prog", fake.recorders(), ["--record", "a", "--out", "x.json"]) == 0
    assert record_main("prog", fake.recorders(), ["--record", "b"]) == 0
    assert fake.calls == [("with_log", "x.json", None), ("without_log", "default.json", 1)]
    assert capsys.readouterr().out == "logged\n"


def test_record_main_passes_options_by_their_dest():
    fake = FakeRecorders()
    options = {"--seeds": {"type": int, "nargs": "*", "default": None},
               "--jobs": {"type": int, "default": 1}}
    record_main("prog", {"a": fake.with_log}, ["--record", "a", "--seeds", "1", "2"],
                options={"--seeds": options["--seeds"]})
    record_main("prog", {"b": fake.without_log}, ["--record", "--jobs", "3"],
                options={"--jobs": options["--jobs"]})
    assert fake.calls == [("with_log", "default.json", [1, 2]),
                          ("without_log", "default.json", 3)]


def test_record_main_sets_the_threads():
    fake, before = FakeRecorders(), torch.get_num_threads()
    try:
        record_main("prog", {"b": fake.without_log}, ["--record"], threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [[], ["--record", "c"], ["--record"], ["--out", "x.json"],
                                  ["--record", "a", "--jobs", "2"]])
def test_record_main_refuses_bad_command_lines(argv, capsys):
    fake = FakeRecorders()
    with pytest.raises(SystemExit) as stop:
        record_main("prog", fake.recorders(), argv)
    assert stop.value.code == 2 and fake.calls == []
    assert "prog" in capsys.readouterr().err


def test_record_main_refuses_bad_recorders():
    with pytest.raises(TypeError, match="recorders"):
        record_main("prog", [print], [])
    with pytest.raises(TypeError, match=r"recorders\['a'\]"):
        record_main("prog", {"a": 3}, [])
    with pytest.raises(ValueError, match="recorders"):
        record_main("prog", {}, [])
    with pytest.raises(TypeError, match="prog"):
        record_main(None, {"a": print}, [])
