"""Random configs never escape as a traceback: every YAML structure and every value for every key is either a run
that passes all of train.py's checks before the rendezvous (``training.preflight``) or one UserError line, and the
run folder is never touched (hypothesis property tests; the subprocess form of the same refusals is in
test_train.py::test_bad_config_exits_with_one_line)."""

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from configs.schema import RunConfig, load_run_config
from training.preflight import preflight
from utils.cli import UserError
from utils.schema import all_keys

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs/cpu_tiny.yaml").read_text())
KEYS = sorted(all_keys(RunConfig))

# values at the edges: zero, negative, huge, wrong type, non-finite, empty, nested
EDGES = st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 10**30, -(10**30), 0.0, -0.5, 1e308, float("inf"),
                         float("-inf"), float("nan"), "", "auto", None, True, [], {}, [0], {"a": 1}])
VALUES = st.one_of(
    EDGES,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 10**6), st.floats(-2, 2), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)
# whole documents that are not a config at all
DOCUMENTS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
                         lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                         max_leaves=8)


def check(tmp: Path, raw) -> None:
    """Write ``raw`` as the YAML config, then load and preflight it: either it passes or it is one UserError line,
    and the run folder does not exist afterwards."""
    run = tmp / "run"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        preflight(load_run_config(path, []), resume="never")
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
    assert not run.exists(), "the checks wrote into the run folder"


def put(raw: dict, key: str, value) -> None:
    """``raw[a][b] = value`` for ``key`` 'a.b'; through a list (``data.sources``), into its first item; a section
    that is no longer a mapping (an earlier value replaced it) is replaced by one."""
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        child = node.get(p)
        if isinstance(child, list) and child and isinstance(child[0], dict):
            child = child[0]
        elif not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def base_config(tmp: Path) -> dict:
    raw = copy.deepcopy(BASE)
    raw["output"]["dir"] = str(tmp / "run")
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
# found by this test: an unknown key holding a newline made a two-line error, first a config key, then a method
# parameter (fixed once for every message, in utils.cli.UserError)
@example(key="data", value={"\n": 0})
@example(key="rope.params", value={"\n": 0})
def test_any_value_for_any_key_is_a_run_or_one_line(tmp_path, key, value):
    raw = base_config(tmp_path)
    put(raw, key, value)
    check(tmp_path, raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=2, max_size=4))
def test_several_bad_values_at_once(tmp_path, pairs):
    raw = base_config(tmp_path)
    for key, value in pairs:
        put(raw, key, value)
    check(tmp_path, raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOCUMENTS)
def test_any_yaml_document_is_one_line(tmp_path, doc):
    check(tmp_path, doc)
