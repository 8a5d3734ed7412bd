"""Tests for the data-only pickle reader.

pickle.loads is called only on pickles that these tests build from trusted
values or write by hand, to compare results, and never on database bytes.
"""

import configparser
import math
import os
import pickle
import pickletools
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import tracemalloc

import pytest

import aepsych_store
from aepsych_store import _PickleDecodeError as PickleDecodeError
from aepsych_store import _PickledGlobal as PickledGlobal
from aepsych_store import _PickledObject as PickledObject
from aepsych_store import _decode_pickle as decode_pickle

from conftest import LEGACY_DIR

LEGACY_DB_DIR = str(LEGACY_DIR)
SINGLE_DB = "aepsych-2022-single-stimulus.db"
MULTI_DB = "aepsych-2022-multi-stimulus.db"

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def assert_same_data(actual, expected, path="value"):
    """Assert that two decoded values are equal with identical types, treating NaN as equal to NaN."""
    assert type(actual) is type(expected), "%s: type %s != %s" % (path, type(actual), type(expected))
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_same_data(left, right, "%s[%d]" % (path, index))
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert_same_data(actual[key], expected[key], "%s[%r]" % (path, key))
    else:
        assert actual == expected, path


def long_binget(index):
    return b"j" + struct.pack("<I", index)


class Reduce:
    """Object that pickles as a call of func(*args), for building hostile payloads without running them."""

    def __init__(self, func, args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.fixture(scope="session")
def legacy_dbs(tmp_path_factory):
    """Copy the two 2022 AEPsych databases to a temporary folder and return their paths."""
    folder = tmp_path_factory.mktemp("legacy-dbs")
    paths = {}
    for name in (SINGLE_DB, MULTI_DB):
        source = os.path.join(LEGACY_DB_DIR, name)
        if not os.path.exists(source):
            pytest.fail("legacy AEPsych database %s not found in %s; set AEPSYCH_LEGACY_DBS" % (name, LEGACY_DB_DIR))
        paths[name] = str(folder / name)
        shutil.copyfile(source, paths[name])
    return paths


def read_rows(path, sql):
    connection = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def read_messages(path):
    return read_rows(path, "SELECT unique_id, message_type, message_contents, extra_info "
                           "FROM replay_data ORDER BY unique_id")


def read_blob(path, sql):
    return read_rows(path, sql)[0][0]


# ---------------------------------------------------------------------------
# Round trips of plain data for every protocol
# ---------------------------------------------------------------------------

SHARED_LIST = [1, "two"]
SHARED_TUPLE = ("k", 2)

ROUND_TRIP_VALUES = [
    None, True, False,
    0, 1, -1, 255, 256, 65535, 65536, 2 ** 31 - 1, -2 ** 31, 2 ** 31, -2 ** 31 - 1,
    2 ** 63, -2 ** 64, 2 ** 200, -(2 ** 200), 2 ** 3000, -(2 ** 3000),
    0.0, -0.0, 0.1, -2.5, 1e300, 5e-324, float("inf"), float("-inf"), float("nan"),
    "", "a", "tell", "é ü 漢字 🎉", "line\nbreak \\ back 'single' \"double\"", "\ud800 lone surrogate",
    "x" * 300, "\x00\x7f\x80\xff",
    b"", b"\x00\xff", bytes(range(256)), b"y" * 300,
    bytearray(b"ab\x00"), bytearray(),
    (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((), ((),)),
    [], [[]], [1, [2, [3, [4]]]], [0.1] * 5,
    {}, {"a": 1}, {1: "x", (1, 2): [3], None: None, 2.5: b"z"},
    {"type": "tell", "message": {"config": {"x1": [0.1], "x2": [4]}, "outcome": 1},
     "extra_info": {"e1": 1, "e2": 2}},
    set(), {1, 2, 3}, {(1, 2), "a", b"b", None}, frozenset(), frozenset({1, frozenset({2, 3})}),
    [SHARED_LIST, SHARED_LIST, {"again": SHARED_LIST}],
    {"left": SHARED_TUPLE, "right": SHARED_TUPLE},
    {"nested": [{"k": (1, "v", [True, None])}], "empty": [[], {}, (), set()]},
    list(range(2000)),
    ["s%d" % index for index in range(300)] * 2,
    [str(index) * 60 for index in range(2000)],
]


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("index", range(len(ROUND_TRIP_VALUES)))
def test_round_trip_matches_pickle(protocol, index):
    blob = pickle.dumps(ROUND_TRIP_VALUES[index], protocol=protocol)
    expected = pickle.loads(blob)

    actual = decode_pickle(blob)

    assert_same_data(actual, expected)


@pytest.mark.parametrize("protocol", range(6))
def test_round_trip_keeps_shared_references(protocol):
    value = [SHARED_LIST, SHARED_LIST, {"again": SHARED_LIST}]

    decoded = decode_pickle(pickle.dumps(value, protocol=protocol))

    assert decoded[0] is decoded[1]
    assert decoded[2]["again"] is decoded[0]


@pytest.mark.parametrize("protocol", range(6))
def test_round_trip_objects_mode_matches(protocol):
    value = {"a": [1, 2.5, "x"], "b": (b"raw", {3, 4}), "c": frozenset({"f"})}
    blob = pickle.dumps(value, protocol=protocol)

    decoded = decode_pickle(blob, allow_objects=True)

    assert_same_data(decoded, pickle.loads(blob))


def test_round_trip_uses_many_frames():
    value = [str(index) * 60 for index in range(2000)]
    blob = pickle.dumps(value, protocol=5)
    frames = [op for op, _, _ in pickletools.genops(blob) if op.name == "FRAME"]

    assert len(frames) > 1
    assert decode_pickle(blob) == value


def test_round_trip_large_memo_uses_long_opcodes():
    strings = ["s%d" % index for index in range(300)]
    blob = pickle.dumps(strings * 2, protocol=3)
    names = {op.name for op, _, _ in pickletools.genops(blob)}

    assert {"LONG_BINPUT", "LONG_BINGET"} <= names
    assert decode_pickle(blob) == strings * 2


# ---------------------------------------------------------------------------
# Hand-written opcodes that Python 3 does not write for plain data
# ---------------------------------------------------------------------------

HAND_WRITTEN = {
    "short_binstring": b"U\x03abc.",
    "binstring": b"T\x03\x00\x00\x00abc.",
    "string_escapes": b"S'a\\nb\\t\\\\ \\x41\\101 \\'q\\' \\\"d\\\"'\n.",
    "string_double_quotes": b'S"it\'s"\n.',
    "binbytes8": b"\x8e" + struct.pack("<Q", 3) + b"abc.",
    "binunicode8": b"\x8d" + struct.pack("<Q", 4) + "é!".encode("utf-8") + b"!.",
    "bytearray8": b"\x80\x05\x96" + struct.pack("<Q", 2) + b"xy.",
    "int_bools": b"(I01\nI00\nI7\nI-3\nl.",
    "long_text_python2": b"L12345678901234567890L\n.",
    "long_text_negative": b"L-5L\n.",
    "float_text": b"(F0.5\nFinf\nF-1e-300\nl.",
    "unicode_text": b"V\\u00e9t\\u00e9 \\U0001f389\n.",
    "long1": b"\x80\x02\x8a\x02\xff\x7f.",
    "long1_empty": b"\x80\x02\x8a\x00.",
    "long4": b"\x80\x02\x8b\x03\x00\x00\x00\x00\x00\x80.",
    "binint_negative": b"J\xfe\xff\xff\xff.",
    "binint2": b"M\xff\xff.",
    "dup": b"K\x012\x86.",
    "pop": b"K\x01K\x020.",
    "pop_discards_mark": b"K\x01(0.",
    "pop_mark": b"K\x01(K\x02K\x031.",
    "put_get_text": b"(lp0\nVx\np1\nag1\na.",
    "python2_dict": b"(dp0\nS'a'\np1\nI1\nsS'b'\np2\nL12345678901234567890L\ns.",
    "dict_opcode": b"(K\x01K\x02K\x03K\x04d.",
    "empty_set_additems": b"\x80\x04\x8f(K\x01K\x02\x90.",
    "frozenset_opcode": b"\x80\x04(K\x01K\x02\x91.",
    "protocol2_set": b"\x80\x02c__builtin__\nset\n]q\x00(K\x01K\x02e\x85q\x01Rq\x02.",
    "protocol0_bytes": b"c_codecs\nencode\n(V\\u00ff\nVlatin1\ntR.",
    "protocol2_empty_bytes": b"\x80\x02c__builtin__\nbytes\n)R.",
    "protocol3_bytearray": b"\x80\x03cbuiltins\nbytearray\nC\x02ab\x85R.",
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_matches_pickle(name):
    blob = HAND_WRITTEN[name]

    assert_same_data(decode_pickle(blob), pickle.loads(blob))


def test_int_text_makes_bools():
    assert decode_pickle(b"I01\n.") is True
    assert decode_pickle(b"I00\n.") is False
    assert type(decode_pickle(b"I1\n.")) is int


def test_short_binstring_non_ascii_rejected():
    with pytest.raises(PickleDecodeError, match=r"SHORT_BINSTRING at byte offset 0"):
        decode_pickle(b"U\x02\xc3\xa9.")


def test_string_unknown_escape_kept():
    # pickle keeps an unknown escape as backslash and letter, with a warning.
    assert decode_pickle(b"S'a\\qb'\n.") == "a\\qb"


def test_string_bad_escape_rejected():
    for blob in (b"S'\\x4'\n.", b"S'abc\\'\n.", b"S'\\400'\n.", b"Sabc\n.", b"S'abc\"\n."):
        with pytest.raises(PickleDecodeError, match=r"STRING at byte offset 0"):
            decode_pickle(blob)


def test_long_text_digit_limit():
    assert decode_pickle(b"I" + b"1" * 4300 + b"\n.") == int("1" * 4300)

    for opcode in (b"I", b"L"):
        with pytest.raises(PickleDecodeError, match=r"has 5000 digits; at most 4300"):
            decode_pickle(opcode + b"1" * 5000 + b"\n.")
    with pytest.raises(PickleDecodeError, match=r"has 10000000 digits"):
        decode_pickle(b"L" + b"9" * 10 ** 7 + b"\n.")


def test_recursive_tuple_objects_mode():
    # Protocols 0 and 1 write POP or POP_MARK for a tuple that contains itself.
    inner = []
    value = (inner,)
    inner.append(value)
    for protocol in range(6):
        decoded = decode_pickle(pickle.dumps(value, protocol=protocol), allow_objects=True)

        assert type(decoded) is tuple
        assert decoded[0][0] is decoded


def test_recursive_tuple_plain_rejected():
    inner = []
    value = (inner,)
    inner.append(value)
    for protocol in range(6):
        with pytest.raises(PickleDecodeError, match=r"reference cycle"):
            decode_pickle(pickle.dumps(value, protocol=protocol))


def test_input_buffer_types_accepted():
    blob = pickle.dumps({"a": [1, 2]}, protocol=5)

    assert decode_pickle(bytearray(blob)) == {"a": [1, 2]}
    assert decode_pickle(memoryview(blob)) == {"a": [1, 2]}


def test_argument_validation():
    with pytest.raises(TypeError):
        decode_pickle("N.")
    for bad_depth in (0, -1, 1001, 2.5, "200", True):
        with pytest.raises(ValueError, match=r"max_depth"):
            decode_pickle(b"N.", max_depth=bad_depth)


def test_opcode_names_match_pickletools():
    expected = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}

    assert aepsych_store._OPCODE_NAMES == expected


# ---------------------------------------------------------------------------
# Real AEPsych 2022 databases
# ---------------------------------------------------------------------------

def single_stimulus_tell(x1, x2, outcome):
    return {"type": "tell", "message": {"config": {"x1": [x1], "x2": [x2]}, "outcome": outcome},
            "extra_info": {"e1": 1, "e2": 2}}


def multi_stimulus_tell(par1, par2, outcome):
    return {"type": "tell", "message": {"config": {"par1": par1, "par2": par2}, "outcome": outcome},
            "extra_info": {"e1": 1, "e2": 2}}


SINGLE_STIMULUS_TELLS = [
    single_stimulus_tell(0.1, 4, 1),
    single_stimulus_tell(0.2, 0.1, -1),
    single_stimulus_tell(0.3, 3, 0.1),
    single_stimulus_tell(1, 0.2, 0),
    single_stimulus_tell(2, 2, -0.1),
    single_stimulus_tell(3, 1, 0),
    single_stimulus_tell(4, 0.3, 0),
]

MULTI_STIMULUS_TELLS = [
    multi_stimulus_tell([0.1, 0.2], [4, 0.1], [1, 0]),
    multi_stimulus_tell([0.3, 1], [3, 0.2], [-1, 0]),
    multi_stimulus_tell([2, 3], [2, 1], [0.1, 0]),
    multi_stimulus_tell([4, 0.1], [0.3, 0.2], [0, 0]),
    multi_stimulus_tell([0.2, 2], [2, 0.3], [-0.1, 0]),
    multi_stimulus_tell([1, 0.3], [1, 0.1], [0, 0]),
    multi_stimulus_tell([0.3, 0.1], [0.3, 4], [0, 0]),
]


@pytest.mark.parametrize("name, parnames, expected_tells", [
    (SINGLE_DB, "[x1, x2]", SINGLE_STIMULUS_TELLS),
    (MULTI_DB, "[par1, par2]", MULTI_STIMULUS_TELLS),
])
def test_real_messages_match_known_contents(legacy_dbs, name, parnames, expected_tells):
    messages = read_messages(legacy_dbs[name])
    decoded = [(message_type, decode_pickle(contents), extra) for _, message_type, contents, extra in messages]

    assert len(decoded) == 15
    assert [message_type for message_type, _, _ in decoded] == ["setup"] + ["ask", "tell"] * 7
    for message_type, message, _ in decoded:
        assert message["type"] == message_type
    setup = decoded[0][1]
    assert "parnames = %s" % parnames in setup["message"]["config_str"]
    tells = [message for message_type, message, _ in decoded if message_type == "tell"]
    assert tells == expected_tells


@pytest.mark.parametrize("name", [SINGLE_DB, MULTI_DB])
def test_real_extra_info_matches(legacy_dbs, name):
    for _, message_type, _, extra in read_messages(legacy_dbs[name]):
        if message_type == "tell":
            assert decode_pickle(extra) == {"e1": 1, "e2": 2}
        else:
            assert extra is None


@pytest.mark.parametrize("name, parnames", [(SINGLE_DB, "[x1, x2]"), (MULTI_DB, "[par1, par2]")])
def test_real_config_holds_ini_options(legacy_dbs, name, parnames):
    path = legacy_dbs[name]
    setup = decode_pickle(read_messages(path)[0][2])
    ini = configparser.ConfigParser(default_section="common")
    ini.read_string(setup["message"]["config_str"])

    config = decode_pickle(read_blob(path, "SELECT config FROM config_data"), allow_objects=True)

    assert isinstance(config, PickledObject)
    assert config.cls == PickledGlobal("aepsych.config", "Config")
    assert config.args == ()
    defaults = config.state["_defaults"]
    sections = config.state["_sections"]
    assert defaults["parnames"] == parnames
    for option, value in ini.defaults().items():
        assert defaults[option] == value
    assert set(sections) == set(ini.sections())
    for section in ini.sections():
        for option in ini.options(section):
            if option not in ini.defaults():
                assert sections[section][option] == ini.get(section, option)


def test_real_config_keeps_inert_references(legacy_dbs):
    config = decode_pickle(read_blob(legacy_dbs[SINGLE_DB], "SELECT config FROM config_data"),
                           allow_objects=True)

    assert config.state["_dict"] == PickledGlobal("builtins", "dict")
    converters = config.state["_converters"]
    assert converters.cls == PickledGlobal("configparser", "ConverterMapping")
    assert converters.state["_parser"] is config
    to_list = converters.state["_data"]["list"]
    assert to_list.cls == PickledGlobal("builtins", "getattr")
    assert to_list.args[0] is config
    assert to_list.args[1] == "_str_to_list"
    common = config.state["_proxies"]["common"]
    assert common.cls == PickledGlobal("configparser", "SectionProxy")
    assert len(repr(config)) < 400


def test_real_config_plain_rejected(legacy_dbs):
    blob = read_blob(legacy_dbs[SINGLE_DB], "SELECT config FROM config_data")

    with pytest.raises(PickleDecodeError, match=r"STACK_GLOBAL at byte offset 37 names aepsych\.config\.Config"):
        decode_pickle(blob)


@pytest.mark.parametrize("name", [SINGLE_DB, MULTI_DB])
def test_real_strat_is_bytesio_record(legacy_dbs, name):
    strat = decode_pickle(read_blob(legacy_dbs[name], "SELECT strat FROM strat_data"), allow_objects=True)

    assert isinstance(strat, PickledObject)
    assert strat.cls == PickledGlobal("_io", "BytesIO")
    assert strat.args == ()
    assert type(strat.state) is tuple
    assert strat.state[0].startswith(b"PK\x03\x04")
    assert strat.state[1:] == (0, None)


@pytest.mark.parametrize("name", [SINGLE_DB, MULTI_DB])
def test_real_message_prefixes_rejected(legacy_dbs, name):
    for _, _, contents, extra in read_messages(legacy_dbs[name]):
        for blob in (contents, extra):
            if blob is None:
                continue
            for end in range(len(blob)):
                with pytest.raises(PickleDecodeError):
                    decode_pickle(blob[:end])


def test_real_config_prefixes_rejected(legacy_dbs):
    blob = read_blob(legacy_dbs[SINGLE_DB], "SELECT config FROM config_data")
    for end in range(len(blob)):
        with pytest.raises(PickleDecodeError):
            decode_pickle(blob[:end], allow_objects=True)


# ---------------------------------------------------------------------------
# Hostile pickles
# ---------------------------------------------------------------------------

def hostile_payloads(canary):
    """Return (name, pickle bytes, callable the pickle names) for payloads that would create canary."""
    command = "touch %s" % canary
    quoted = repr(command).encode("ascii")
    system = (os.system.__module__, "system")
    payloads = [
        ("reduce_global", pickle.dumps(Reduce(os.system, (command,)), protocol=2), system),
        ("reduce_global_protocol0", pickle.dumps(Reduce(os.system, (command,)), protocol=0), system),
        ("reduce_stack_global", pickle.dumps(Reduce(os.system, (command,)), protocol=4), system),
        ("inst", b"(S" + quoted + b"\nios\nsystem\n.", ("os", "system")),
        ("obj", b"(cos\nsystem\nS" + quoted + b"\no.", ("os", "system")),
        ("newobj", b"\x80\x02cos\nsystem\nS" + quoted + b"\n\x85\x81.", ("os", "system")),
        ("newobj_ex", b"\x80\x04\x8c\x02os\x8c\x06system\x93S" + quoted + b"\n\x85}\x92.", ("os", "system")),
        ("build_setstate",
         b"\x80\x02cargparse\nNamespace\n)\x81}S'__setstate__'\ncos\nsystem\nsbS" + quoted + b"\nb.",
         ("argparse", "Namespace")),
        ("eval", pickle.dumps(Reduce(eval, ("__import__('os').system(%r)" % command,)), protocol=3),
         ("builtins", "eval")),
        ("exec", pickle.dumps(Reduce(exec, ("import os; os.system(%r)" % command,)), protocol=4),
         ("builtins", "exec")),
        ("popen", pickle.dumps(Reduce(subprocess.Popen, (["touch", str(canary)],)), protocol=3),
         ("subprocess", "Popen")),
        ("getattr_chain",
         b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nS'os'\n\x85RS'system'\n\x86RS" + quoted + b"\n\x85R.",
         ("builtins", "getattr")),
    ]
    return payloads


EXTENSION_PAYLOADS = {
    "ext1": b"\x80\x02\x82\x01S'touch x'\n\x85R.",
    "ext2": b"\x80\x02\x83\x01\x02S'touch x'\n\x85R.",
    "ext4": b"\x80\x02\x84\x01\x02\x03\x04S'touch x'\n\x85R.",
}


def test_hostile_payloads_rejected(tmp_path):
    canary = tmp_path / "CANARY"
    for name, blob, (module, function) in hostile_payloads(canary):
        with pytest.raises(PickleDecodeError) as caught:
            decode_pickle(blob)

        message = str(caught.value)
        assert re.search(r"(GLOBAL|STACK_GLOBAL|INST|OBJ|NEWOBJ|NEWOBJ_EX) at byte offset \d+", message), name
        assert "%s.%s" % (module, function) in message, name
        assert not canary.exists(), name


def test_hostile_payloads_inert_in_objects_mode(tmp_path):
    canary = tmp_path / "CANARY"
    for name, blob, (module, function) in hostile_payloads(canary):
        if name == "build_setstate":
            with pytest.raises(PickleDecodeError, match=r"BUILD at byte offset \d+ sets the state"):
                decode_pickle(blob, allow_objects=True)
        else:
            record = decode_pickle(blob, allow_objects=True)
            assert isinstance(record, PickledObject), name
            callables = {record.cls}
            if isinstance(record.cls, PickledObject):
                callables.add(record.cls.cls)
            assert PickledGlobal(module, function) in callables, name
        assert not canary.exists(), name


def test_hostile_payload_is_genuine(tmp_path):
    # The payload is checked by inspection, never by running it.
    canary = tmp_path / "CANARY"
    blob = pickle.dumps(Reduce(os.system, ("touch %s" % canary,)), protocol=4)

    record = decode_pickle(blob, allow_objects=True)

    assert record.cls == PickledGlobal(os.system.__module__, "system")
    assert record.args == ("touch %s" % canary,)
    assert not canary.exists()


@pytest.mark.parametrize("name", sorted(EXTENSION_PAYLOADS))
def test_extension_codes_rejected(name):
    opcode = name.upper()
    for allow_objects in (False, True):
        with pytest.raises(PickleDecodeError, match=r"%s at byte offset 2 refers to the copyreg" % opcode):
            decode_pickle(EXTENSION_PAYLOADS[name], allow_objects=allow_objects)


def test_persistent_ids_rejected():
    for blob, opcode in ((b"Pid\n.", "PERSID"), (b"K\x01Q.", "BINPERSID")):
        for allow_objects in (False, True):
            with pytest.raises(PickleDecodeError, match=r"%s at byte offset" % opcode):
                decode_pickle(blob, allow_objects=allow_objects)


def test_out_of_band_buffers_rejected():
    blob = pickle.dumps(pickle.PickleBuffer(b"abc"), protocol=5, buffer_callback=lambda buffer: False)
    assert b"\x97" in blob
    for allow_objects in (False, True):
        with pytest.raises(PickleDecodeError, match=r"NEXT_BUFFER at byte offset \d+"):
            decode_pickle(blob, allow_objects=allow_objects)
        with pytest.raises(PickleDecodeError, match=r"READONLY_BUFFER at byte offset 0"):
            decode_pickle(b"\x98.", allow_objects=allow_objects)


def test_import_never_happens(tmp_path, monkeypatch):
    canary = tmp_path / "CANARY"
    module_name = "canary_module_%d" % os.getpid()
    (tmp_path / (module_name + ".py")).write_text(
        "open(%r, 'w').close()\ndef run(*args):\n    open(%r, 'w').close()\n" % (str(canary), str(canary)))
    monkeypatch.syspath_prepend(str(tmp_path))
    blob = b"\x80\x02c" + module_name.encode("ascii") + b"\nrun\n)R."

    with pytest.raises(PickleDecodeError, match=module_name + r"\.run"):
        decode_pickle(blob)
    record = decode_pickle(blob, allow_objects=True)

    assert record.cls == PickledGlobal(module_name, "run")
    assert module_name not in sys.modules
    assert not canary.exists()


def test_allowed_constructor_wrong_arguments():
    cases = [
        (b"\x80\x02cbuiltins\nset\nK\x01\x85R.", "builtins.set"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R.", "_codecs.encode"),
        (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00\xe2\x82\xacX\x06\x00\x00\x00latin1\x86R.",
         "_codecs.encode"),
        (b"\x80\x02c__builtin__\nbytes\nC\x01x\x85R.", "__builtin__.bytes"),
        (b"\x80\x02cbuiltins\nbytearray\nK\x05\x85R.", "builtins.bytearray"),
    ]
    for blob, name in cases:
        with pytest.raises(PickleDecodeError, match=r"REDUCE at byte offset \d+ calls %s with invalid" % name):
            decode_pickle(blob)


def test_allowed_constructor_not_called_rejected():
    with pytest.raises(PickleDecodeError, match=r"contains the global builtins\.set itself"):
        decode_pickle(b"\x80\x02cbuiltins\nset\n.")
    with pytest.raises(PickleDecodeError, match=r"NEWOBJ at byte offset \d+ would call builtins\.set"):
        decode_pickle(b"\x80\x02cbuiltins\nset\n)\x81.")
    with pytest.raises(PickleDecodeError, match=r"REDUCE at byte offset 4 would call a value of type list"):
        decode_pickle(b"\x80\x02])R.")


# ---------------------------------------------------------------------------
# Malformed streams
# ---------------------------------------------------------------------------

MALFORMED = [
    (b"", r"ends at byte offset 0 without a STOP"),
    (b"N", r"ends at byte offset 1 without a STOP"),
    (b"\x80\x05N", r"ends at byte offset 3 without a STOP"),
    (b"\x80\x06N.", r"PROTO at byte offset 0 declares protocol 6"),
    (b"\x80", r"PROTO at byte offset 0 is truncated"),
    (b"N.N", r"STOP at byte offset 1 is followed by 1 more bytes"),
    (b".", r"STOP at byte offset 0 expects exactly one value on the stack, found 0"),
    (b"NN.", r"STOP at byte offset 2 expects exactly one value on the stack, found 2"),
    (b"(N.", r"STOP at byte offset 2 leaves 1 MARK\(s\) unclosed"),
    (b"a.", r"APPEND at byte offset 0 causes a stack underflow"),
    (b"]N(a.", r"APPEND at byte offset 3 causes a stack underflow"),
    (b"Ne.", r"APPENDS at byte offset 1 causes a stack underflow: .* or a MARK that is missing"),
    (b"}(N.u", r"STOP at byte offset 3 leaves 1 MARK"),
    (b"}(Nu.", r"SETITEMS at byte offset 3 has a key without a value"),
    (b"}]Ns.", r"SETITEM at byte offset 3 has an invalid argument or operand: unhashable"),
    (b"]NNs.", r"SETITEM at byte offset 3 needs a dict below its operands, not list"),
    (b"NNa.", r"APPEND at byte offset 2 needs a list below its operands, not NoneType"),
    (b"h\x00.", r"BINGET at byte offset 0 refers to a memo key that is not defined"),
    (b"j\x05\x00\x00\x00.", r"LONG_BINGET at byte offset 0 refers to a memo key"),
    (b"g3\n.", r"GET at byte offset 0 refers to a memo key"),
    (b"g-1\n.", r"GET at byte offset 0 has a negative memo key -1"),
    (b"Nq\x05.", r"BINPUT at byte offset 1 stores memo key 5 while the memo has 0 entries"),
    (b"Nr\xff\xff\xff\xff.", r"LONG_BINPUT at byte offset 1 stores memo key 4294967295"),
    (b"\x94.", r"MEMOIZE at byte offset 0 causes a stack underflow"),
    (b"\x8c\x05ab.", r"SHORT_BINUNICODE at byte offset 0 is truncated: its argument needs 5 bytes but 3 remain"),
    (b"\x8c", r"SHORT_BINUNICODE at byte offset 0 is truncated"),
    (b"K", r"BININT1 at byte offset 0 is truncated"),
    (b"G\x00\x00", r"BINFLOAT at byte offset 0 is truncated"),
    (b"J\x00", r"BININT at byte offset 0 is truncated"),
    (b"I12", r"INT at byte offset 0 is truncated: its text argument has no terminating newline"),
    (b"Iabc\n.", r"INT at byte offset 0 has an invalid argument or operand"),
    (b"F1.2.3\n.", r"FLOAT at byte offset 0 has an invalid argument"),
    (b"X\x02\x00\x00\x00\xff\xfe.", r"BINUNICODE at byte offset 0 has an invalid argument"),
    (b"V\\u12\n.", r"UNICODE at byte offset 0 has an invalid argument"),
    (b"\x8b\xff\xff\xff\xff.", r"LONG4 at byte offset 0 has a negative length -1"),
    (b"T\xff\xff\xff\xff.", r"BINSTRING at byte offset 0 has a negative length -1"),
    (b"\x00.", r"unknown opcode 0x00 at byte offset 0"),
    (b"N\xff.", r"unknown opcode 0xff at byte offset 1"),
    (b"\x93.", r"STACK_GLOBAL at byte offset 0 causes a stack underflow"),
    (b"K\x01K\x02\x93.", r"STACK_GLOBAL at byte offset 4 needs a str module and name, not int and int"),
    (b"cos\n", r"GLOBAL at byte offset 0 is truncated"),
    (b"c\xff\nx\n.", r"GLOBAL at byte offset 0 has an invalid argument"),
    (b"K\x01)R.", r"REDUCE at byte offset 3 would call a value of type int"),
    (b"NNR.", r"REDUCE at byte offset 2 needs a tuple of arguments, not NoneType"),
    (b"N}b.", r"BUILD at byte offset 2 would set an object's state"),
    (b"1.", r"POP_MARK at byte offset 0 causes a stack underflow: .* or a MARK that is missing"),
    (b"0.", r"POP at byte offset 0 causes a stack underflow"),
    (b"2.", r"DUP at byte offset 0 causes a stack underflow"),
    (b"(K\x01d.", r"DICT at byte offset 3 has a key without a value"),
    (b"NN\x90.", r"ADDITEMS at byte offset 2 causes a stack underflow: .* or a MARK that is missing"),
    (b"N(K\x01\x90.", r"ADDITEMS at byte offset 4 needs a set below its operands, not NoneType"),
    (b"\x95\x05\x00\x00\x00\x00\x00\x00\x00N.", r"FRAME at byte offset 0 is truncated: its argument needs 5 bytes but 2 remain"),
]


@pytest.mark.parametrize("blob, pattern", MALFORMED)
def test_malformed_stream_rejected(blob, pattern):
    for allow_objects in (False, True):
        if allow_objects and pattern.startswith(("REDUCE at byte offset 3 would call", "BUILD")):
            continue
        with pytest.raises(PickleDecodeError, match=pattern):
            decode_pickle(blob, allow_objects=allow_objects)


def test_build_target_must_be_record():
    with pytest.raises(PickleDecodeError, match=r"BUILD at byte offset 2 needs an object record below its operands, not list"):
        decode_pickle(b"]}b.", allow_objects=True)


def test_build_twice_rejected():
    blob = b"\x80\x02cm\nC\n)\x81}b}b."

    with pytest.raises(PickleDecodeError, match=r"BUILD at byte offset \d+ sets the state of an object that already has one"):
        decode_pickle(blob, allow_objects=True)


def test_objects_mode_collects_items():
    blob = (b"\x80\x04\x8c\x01m\x8c\x01C\x93)\x81"
            b"K\x01a(K\x02K\x03e"
            b"\x8c\x01kK\x04s(\x8c\x01jK\x05u"
            b"(K\x06\x90"
            b"}b.")

    record = decode_pickle(blob, allow_objects=True)

    assert record.cls == PickledGlobal("m", "C")
    assert record.listitems == [1, 2, 3, 6]
    assert record.dictitems == {"k": 4, "j": 5}
    assert record.state == {}


def test_objects_mode_newobj_ex_and_obj():
    newobj_ex = b"\x80\x04\x8c\x01m\x8c\x01C\x93K\x01\x85}\x8c\x01kK\x02s\x92."
    obj = b"(cm\nC\nK\x01K\x02o."
    inst = b"(K\x01K\x02im\nC\n."

    first = decode_pickle(newobj_ex, allow_objects=True)
    second = decode_pickle(obj, allow_objects=True)
    third = decode_pickle(inst, allow_objects=True)

    assert (first.cls, first.args, first.kwargs) == (PickledGlobal("m", "C"), (1,), {"k": 2})
    assert (second.cls, second.args) == (PickledGlobal("m", "C"), (1, 2))
    assert (third.cls, third.args) == (PickledGlobal("m", "C"), (1, 2))


def test_pickled_global_value_semantics():
    first = PickledGlobal("builtins", "dict")
    second = PickledGlobal("builtins", "dict")

    assert first == second
    assert hash(first) == hash(second)
    assert first != PickledGlobal("builtins", "list")
    assert first != ("builtins", "dict")
    assert {first: 1}[second] == 1
    assert repr(first) == "_PickledGlobal('builtins', 'dict')"


def test_pickled_object_repr_is_bounded():
    record = PickledObject(PickledGlobal("m", "C"), (2 ** 100000, "x" * 1000, [1] * 10))
    record.state = {"self": record}
    record.listitems.append(record)

    text = repr(record)

    assert text.startswith("_PickledObject(_PickledGlobal('m', 'C'), args=(<int of 100001 bits>, ")
    assert len(text) < 400
    assert record != PickledObject(PickledGlobal("m", "C"), record.args)


# ---------------------------------------------------------------------------
# Nesting, cycles and shared references
# ---------------------------------------------------------------------------

DEEP = 100000

DEEP_PICKLES = {
    "mark_list": b"(" * DEEP + b"l" * DEEP + b".",
    "append_chain": b"]" * (DEEP + 1) + b"a" * DEEP + b".",
    "tuple1_chain": b")" + b"\x85" * DEEP + b".",
    "dict_chain": b"(K\x01" * DEEP + b"}" + b"d" * DEEP + b".",
    "frozenset_chain": b"(" * DEEP + b"\x91" * DEEP + b".",
    "memo_trick": b"]\x94" + b"".join(long_binget(index) + b"]\x94a0" for index in range(DEEP)) + b".",
    "tuple_key_setitem": b"})" + b"\x85" * DEEP + b"Ns.",
    "tuple_key_setitems": b"}()" + b"\x85" * DEEP + b"Nu.",
    "tuple_key_dict": b"()" + b"\x85" * DEEP + b"Nd.",
    "tuple_key_frozenset": b"()" + b"\x85" * DEEP + b"\x91.",
    "tuple_key_additems": b"\x8f()" + b"\x85" * DEEP + b"\x90.",
    "tuple_key_set_reduce": b"cbuiltins\nset\n])" + b"\x85" * DEEP + b"a\x85R.",
}


@pytest.mark.parametrize("name", sorted(DEEP_PICKLES))
def test_deep_nesting_rejected(name):
    for allow_objects in (False, True):
        with pytest.raises(PickleDecodeError, match=r"nested deeper than max_depth=200"):
            decode_pickle(DEEP_PICKLES[name], allow_objects=allow_objects)


def test_deep_nesting_objects_rejected():
    # Each record gets the previous one as its BUILD state, through the memo.
    steps = b"".join(b"h\x00)\x81\x94" + long_binget(index + 1) + b"b0" for index in range(DEEP))
    blob = b"\x80\x04\x8c\x01m\x8c\x01C\x93\x940N\x940" + steps + long_binget(DEEP + 1) + b"."
    with pytest.raises(PickleDecodeError, match=r"nested deeper than max_depth=200"):
        decode_pickle(blob, allow_objects=True)


def test_max_depth_boundary():
    nested = []
    for _ in range(9):
        nested = [nested]
    blob = pickle.dumps(nested, protocol=5)

    assert decode_pickle(blob, max_depth=10) == nested
    with pytest.raises(PickleDecodeError, match=r"max_depth=9"):
        decode_pickle(blob, max_depth=9)


def test_max_depth_boundary_shared():
    # The same depth limit holds when the walk runs because of a GET.
    nested = []
    for _ in range(9):
        nested = [nested, nested]
    blob = pickle.dumps(nested, protocol=5)

    assert decode_pickle(blob, max_depth=10) == nested
    with pytest.raises(PickleDecodeError, match=r"max_depth=9"):
        decode_pickle(blob, max_depth=9)


def dag_list_pickle(levels):
    """Return a pickle of L0 = [] and L(i+1) = [L(i), L(i)], built with the memo."""
    body = b"".join(b"(" + long_binget(index) * 2 + b"l\x940" for index in range(levels))
    return b"]\x940" + body + long_binget(levels) + b"."


def test_shared_dag_small_decodes():
    value = decode_pickle(dag_list_pickle(15))

    assert value[0] is value[1]
    assert value[0][0] is value[1][1]


def test_shared_dag_expansion_rejected_fast():
    started = time.monotonic()
    with pytest.raises(PickleDecodeError, match=r"shared references expand to more than"):
        decode_pickle(dag_list_pickle(150))

    assert time.monotonic() - started < 2


def test_shared_dag_objects_mode_linear():
    started = time.monotonic()
    value = decode_pickle(dag_list_pickle(150), allow_objects=True)

    assert time.monotonic() - started < 2
    assert value[0] is value[1]


def test_shared_tuple_key_expansion_rejected_fast():
    levels = 100
    body = b"".join(long_binget(index) * 2 + b"\x86\x940" for index in range(levels))
    blob = b"})\x940" + body + long_binget(levels) + b"Ns."
    started = time.monotonic()

    for allow_objects in (False, True):
        with pytest.raises(PickleDecodeError, match=r"SETITEM at byte offset \d+ has tuple keys that together expand"):
            decode_pickle(blob, allow_objects=allow_objects)

    assert time.monotonic() - started < 2


def test_shared_tuple_key_small_matches_pickle():
    key = ()
    for _ in range(8):
        key = (key, key)
    blob = pickle.dumps({key: 1, "other": [key]}, protocol=5)

    assert decode_pickle(blob) == pickle.loads(blob)


def test_cycle_plain_rejected():
    cases = {
        "list_dup": b"]2a.",
        "list_memo": b"]\x94h\x00a.",
        "dict_memo": b"}\x94K\x01h\x00s.",
        "tuple_through_list": b"]\x94h\x00\x85a.",
    }
    for name, blob in cases.items():
        with pytest.raises(PickleDecodeError, match=r"STOP at byte offset \d+ finishes a value that contains itself"):
            decode_pickle(blob)
        assert decode_pickle(blob, allow_objects=True) is not None, name


def test_self_list_objects_mode():
    value = decode_pickle(b"]\x942a.", allow_objects=True)

    assert value[0] is value


# ---------------------------------------------------------------------------
# Length fields that claim huge sizes
# ---------------------------------------------------------------------------

def huge_length_pickles(length):
    cases = {
        "BINBYTES8": b"\x8e" + struct.pack("<Q", length),
        "BINUNICODE8": b"\x8d" + struct.pack("<Q", length),
        "BYTEARRAY8": b"\x96" + struct.pack("<Q", length),
        "FRAME": b"\x95" + struct.pack("<Q", length),
    }
    if length < 2 ** 32:
        cases["BINUNICODE"] = b"X" + struct.pack("<I", length)
        cases["BINBYTES"] = b"B" + struct.pack("<I", length)
    if length < 2 ** 31:
        cases["BINSTRING"] = b"T" + struct.pack("<i", length)
        cases["LONG4"] = b"\x8b" + struct.pack("<i", length)
    return cases


@pytest.mark.parametrize("length", [2 ** 31 - 1, 2 ** 31, 2 ** 62, 2 ** 64 - 1])
def test_huge_length_no_allocation(length):
    for name, blob in huge_length_pickles(length).items():
        for padding in (b"", b"N" * 64 + b"."):
            tracemalloc.start()
            try:
                with pytest.raises(PickleDecodeError, match=r"%s at byte offset 0 is truncated" % name):
                    decode_pickle(blob + padding)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

            assert peak < 2 * 1024 * 1024, name


# ---------------------------------------------------------------------------
# Fuzzing
# ---------------------------------------------------------------------------

def fuzz_seeds():
    seeds = [pickle.dumps(value, protocol=protocol)
             for protocol in range(6)
             for value in ROUND_TRIP_VALUES[::5]]
    seeds += list(HAND_WRITTEN.values())
    for path in (os.path.join(LEGACY_DB_DIR, SINGLE_DB), os.path.join(LEGACY_DB_DIR, MULTI_DB)):
        if os.path.exists(path):
            seeds += [row[2] for row in read_messages(path)]
            seeds.append(read_blob(path, "SELECT config FROM config_data"))
    return [seed for seed in seeds if len(seed) < 20000]


def mutate(rng, seed):
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        position = rng.randrange(len(data) + 1)
        if choice < 0.35 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.55:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice < 0.75 and data:
            del data[position:position + rng.randint(1, 8)]
        elif choice < 0.9:
            data[position:position] = rng.choice(INTERESTING_CHUNKS)
        else:
            other = rng.choice(FUZZ_SEEDS)
            start = rng.randrange(len(other) + 1)
            data[position:position] = other[start:start + rng.randint(1, 32)]
    return bytes(data)


INTERESTING_CHUNKS = [
    b"(", b"u", b"e", b"s", b"a", b"2", b"0", b"1", b"\x94", b"h\x00", b"h\x01", b"j\x00\x00\x00\x00",
    b"\x85", b"\x86", b"\x87", b"t", b"l", b"d", b"\x91", b"\x90", b"R", b"b", b"\x81", b"\x92",
    b"\x93", b"cbuiltins\nset\n", b"c_codecs\nencode\n", b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x8b\xff\xff\xff\x7f", b"I" + b"9" * 5000 + b"\n", b"\x8c\x01\xff", b"S'\\x'\n", b".",
]

FUZZ_SEEDS = fuzz_seeds()


def run_fuzz_case(data):
    for allow_objects in (False, True):
        try:
            decode_pickle(data, allow_objects=allow_objects)
        except PickleDecodeError:
            pass
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure under test
            pytest.fail("%s escaped for allow_objects=%s on input %s: %r"
                        % (type(exc).__name__, allow_objects, data[:200].hex(), exc))


def test_fuzz_random_bytes():
    rng = random.Random(20221027)
    deadline = time.monotonic() + 2.5
    cases = 0
    while time.monotonic() < deadline:
        length = rng.choice((1, 2, 3, 5, 8, 16, 64, 256))
        data = bytes(rng.randrange(256) for _ in range(length))
        if rng.random() < 0.5:
            data = b"\x80" + bytes((rng.randrange(6),)) + data
        run_fuzz_case(data)
        cases += 1
    assert cases > 100


def test_fuzz_mutations():
    rng = random.Random(5)
    deadline = time.monotonic() + 2.5
    cases = 0
    while time.monotonic() < deadline:
        run_fuzz_case(mutate(rng, rng.choice(FUZZ_SEEDS)))
        cases += 1
    assert cases > 100
