"""rtkern.adapters.vllm without vLLM: import safety, argument validation, and the batch bookkeeping.

vLLM is not installed here. `RefusalBatchState` reads only the documented shape of vLLM v1's
``BatchUpdate`` (``removed`` indices; ``added`` ``(index, SamplingParams, prompt_tok_ids,
output_tok_ids)``; ``moved`` ``(i, j, MoveDirectionality)``) and ``SamplingParams.extra_args``, so the
tests drive it with plain objects of that shape and check what it does to a logits tensor.
"""
import enum
from types import SimpleNamespace

import pytest
import torch

from rtkern import RefusalControls, RefusalSpec, apply_refusal_
from rtkern.adapters import vllm as rv

V = 64
REFUSE = (40, 41, 42)
RESPOND = 43
NAMES = ("Humanizing requests", "Incomplete requests", "Requests with safety concerns")
SPEC = RefusalSpec(list(REFUSE), RESPOND, names=NAMES)
NEG = float("-inf")


class MoveDirectionality(enum.Enum):  # vLLM's enum, by name (its values changed across releases)
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


def batch_update(size, removed=(), added=(), moved=()):
    return SimpleNamespace(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def params(**extra):
    return SimpleNamespace(extra_args=extra or None)


def make_logits(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, V, generator=g) * 2
    z[:, list(REFUSE)] += torch.tensor([1.0, 2.5, 0.5])  # refusal probabilities of a few percent
    return z


def one_row(z, thresholds=0.5, mode="category", logit_bias=0.0):
    """What rtkern itself does to one first-position row."""
    row = z[None].clone()
    c = RefusalControls.build(1, 3, "cpu", thresholds=thresholds, mode=mode, logit_bias=logit_bias)
    res = apply_refusal_(row, SPEC, c, backend="torch")
    return row[0], res


def masked(z):
    out = z.clone()
    out[list(REFUSE) + [RESPOND]] = NEG
    return out


def test_import_without_vllm_and_construction_error():
    assert isinstance(rv.HAVE_VLLM, bool)
    if rv.HAVE_VLLM:
        pytest.skip("vLLM is installed: construction is vLLM's business")
    with pytest.raises(ImportError, match="needs vLLM"):
        rv.RefusalLogitsProcessor(None, torch.device("cpu"), False)
    bound = rv.make_logits_processor(SPEC, thresholds={NAMES[0]: 1.5}, runner="v1")
    assert issubclass(bound, rv.RefusalLogitsProcessor) and bound.spec is SPEC
    with pytest.raises(ImportError, match="needs vLLM"):
        bound(None, torch.device("cpu"), False)


def test_validate_params():
    bound = rv.make_logits_processor(SPEC)
    ok = [params(), params(refusal_thresholds=0.3), params(refusal_thresholds=[0.1, 0.2, 1.5]),
          params(refusal_thresholds={NAMES[2]: 0.05}, refusal_mode="sum", refusal_logit_bias={1: -2.0}),
          params(other_processor_arg=7), SimpleNamespace(extra_args=None)]
    for p in ok:
        assert bound.validate_params(p) is None
    bad = {"unknown category": params(refusal_thresholds={"Harmful": 0.2}),
           "must be one of": params(refusal_mode="strict"),
           ">= 0": params(refusal_thresholds=-0.1),
           "3 numbers": params(refusal_thresholds=[0.1, 0.2]),
           "unknown refusal argument": params(refusal_threshold=0.2),
           "real numbers": params(refusal_thresholds={NAMES[0]: "high"}),
           "logit_bias must be finite": params(refusal_logit_bias=float("inf"))}
    for msg, p in bad.items():
        with pytest.raises(ValueError, match=msg):
            bound.validate_params(p)
    # Unbound (spec found per engine): category names of either scheme pass, others do not.
    rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds={"Unsupported requests": 0.9}))
    rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds={"refuse": 0.9}))
    with pytest.raises(ValueError, match="unknown refusal category"):
        rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds={"Harmful": 0.2}))
    with pytest.raises(ValueError, match="scheme"):
        rv.make_logits_processor(scheme="multi")
    with pytest.raises(ValueError, match="unknown category"):
        rv.make_logits_processor(SPEC, thresholds={"Harmful": 0.2})


def test_added_rows_first_position_and_later_positions():
    st = rv.RefusalBatchState(SPEC, thresholds=0.04)
    outs = [[], [], [], [7, 8]]  # row 3 resumes a request that already has output tokens
    st.update(batch_update(4, added=[
        (0, params(), [1, 2], outs[0]),
        (1, params(refusal_thresholds={NAMES[1]: 0.0}), [3], outs[1]),  # always passes: refuses
        (2, params(refusal_mode="free", refusal_logit_bias=[0.0, 0.0, 3.0]), [4], outs[2]),
        (3, params(refusal_thresholds=0.0), [5], outs[3]),
    ]))
    z = make_logits(4)
    got = st.apply(z.clone())
    row0, res0 = one_row(z[0], thresholds=0.04)
    torch.testing.assert_close(got[0], row0)
    row1, res1 = one_row(z[1], thresholds=[0.04, 0.0, 0.04])
    torch.testing.assert_close(got[1], row1)
    assert int(res1.refused) >= 0 and got[1].argmax() == res1.tokens[0] and torch.isinf(got[1]).sum() == V - 1
    row2, _ = one_row(z[2], mode="free", logit_bias=[0.0, 0.0, 3.0])
    torch.testing.assert_close(got[2], row2)
    assert got[2, REFUSE[2]] == z[2, REFUSE[2]] + 3.0 and torch.isfinite(got[2]).all()  # free: controls stay
    torch.testing.assert_close(got[3], masked(z[3]))  # not a first position, whatever its thresholds
    assert st.last_rows.tolist() == [0, 1, 2]
    torch.testing.assert_close(st.last_output.refused, torch.cat([res0.refused, res1.refused, torch.tensor(
        [-1], dtype=torch.int32)]))

    for o in outs:  # the engine appends to the live lists it handed over
        o.append(9)
    z2 = make_logits(4, seed=1)
    st.update(None)
    torch.testing.assert_close(st.apply(z2.clone()), torch.stack([masked(r) for r in z2]))
    assert st.last_rows is None


@pytest.mark.parametrize("field", ["structured_outputs", "guided_decoding"])
def test_structured_output_requests_keep_the_grammars_tokens(field):
    # vLLM masks a grammar-constrained request's logits before this processor: deciding would read p = 0
    # and force [respond], a token the grammar forbids. Such a row only gets its control tokens masked.
    st = rv.RefusalBatchState(SPEC, thresholds=0.0)   # would refuse every decided row
    grammar = SimpleNamespace(extra_args=None, **{field: object()})
    st.update(batch_update(2, added=[(0, grammar, [1], []), (1, params(), [1], [])]))
    z = make_logits(2)
    z[0, 5:] = NEG                                   # the grammar allows tokens 0..4 only
    got = st.apply(z.clone())
    torch.testing.assert_close(got[0], z[0])
    assert st.last_rows.tolist() == [1] and int(st.last_output.refused[0]) >= 0


def test_removed_added_moved_rows_follow_their_requests():
    st = rv.RefusalBatchState(SPEC)
    a_out, b_out, c_out = [], [5], []
    st.update(batch_update(3, added=[(0, params(refusal_thresholds=0.0), [1], a_out),   # A: refuses
                                     (1, params(), [1], b_out),                           # B: later position
                                     (2, params(refusal_thresholds=2.0), [1], c_out)]))   # C: answers
    # Before any step: A leaves, D (answers) takes row 0, then B and C swap, then C moves on to row 3.
    d_out = []
    st.update(batch_update(3, removed=[0], added=[(0, params(refusal_thresholds=2.0), [2], d_out)],
                           moved=[(1, 2, MoveDirectionality.SWAP)]))
    st.update(batch_update(4, moved=[(1, 3, MoveDirectionality.UNIDIRECTIONAL)]))
    assert sorted(st.requests) == [0, 2, 3]
    z = make_logits(4, seed=2)
    got = st.apply(z.clone())
    assert got[0].argmax() == RESPOND and torch.isinf(got[0]).sum() == V - 1   # D
    torch.testing.assert_close(got[2], masked(z[2]))                             # B, later position
    assert got[3].argmax() == RESPOND and torch.isinf(got[3]).sum() == V - 1   # C
    torch.testing.assert_close(got[1], masked(z[1]))                             # empty row: controls masked
    assert st.last_rows.tolist() == [0, 3]
    st.update(batch_update(3, removed=[3]))  # C finishes: its row is no longer governed by its request
    assert sorted(st.requests) == [0, 2]
    torch.testing.assert_close(st.apply(z.clone())[3], masked(z[3]))


def test_legacy_added_layout_and_dtypes():
    # vLLM 0.10.0/0.10.1 put prompt_tok_ids first: (prompt_tok_ids, index, params, output_tok_ids).
    st = rv.RefusalBatchState(SPEC, thresholds=0.0)
    st.update(batch_update(2, added=[([1, 2], 1, params(), []), (None, 0, params(refusal_mode="sum"), [])]))
    z = make_logits(2, seed=3)
    for dtype in (torch.bfloat16, torch.float64):
        st2 = rv.RefusalBatchState(SPEC, thresholds=0.0)
        st2.update(batch_update(2, added=[(0, params(), None, []), (1, params(), None, [])]))
        out = st2.apply(z.to(dtype))
        assert out.dtype == dtype and torch.isin(out.argmax(1), torch.tensor(REFUSE)).all()
    got = st.apply(z.clone())
    assert torch.isin(got.argmax(1), torch.tensor(REFUSE)).all()
    assert got[0].argmax() == REFUSE[int(torch.softmax(z[0], 0)[list(REFUSE)].argmax())]
    with pytest.raises(TypeError, match="BatchUpdate.added"):
        st.update(batch_update(1, added=[(0, params())]))


def test_bad_request_arguments_fall_back_to_defaults(caplog):
    st = rv.RefusalBatchState(SPEC, thresholds=2.0)
    st.update(batch_update(1, added=[(0, params(refusal_thresholds={"Harmful": 0.0}), None, [])]))
    assert "ignoring bad refusal arguments" in caplog.text
    got = st.apply(make_logits(1))
    assert got[0].argmax() == RESPOND


def test_state_rejects_bad_defaults():
    with pytest.raises(TypeError, match="RefusalSpec"):
        rv.RefusalBatchState([1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        rv.RefusalBatchState(SPEC, thresholds=float("nan"))
    with pytest.raises(TypeError, match="one string"):
        rv.RefusalBatchState(SPEC, mode=["category"])
    with pytest.raises(ValueError, match="backend"):
        rv.RefusalBatchState(SPEC, backend="cuda")
    st = rv.RefusalBatchState(SPEC)
    for bad in (torch.zeros(2, V, dtype=torch.int64), torch.zeros(V), [[0.0] * V]):
        with pytest.raises(TypeError, match="floating"):
            st.apply(bad)


def test_logits_too_narrow_for_the_control_ids_are_rejected():
    # With no row at its first position, apply used to index_fill_ out of range (IndexError).
    st = rv.RefusalBatchState(SPEC)
    with pytest.raises(ValueError, match=r"control token ids \[41, 42, 43\] are out of range for a vocabulary of 41"):
        st.apply(torch.zeros(2, 41))
    st.add(0, params(), [])
    with pytest.raises(ValueError, match=r"out of range for a vocabulary of 41"):
        st.apply(torch.zeros(2, 41))


@pytest.mark.parametrize("index", [-1, 1.0, True, None])
def test_bad_row_index_is_rejected_on_add_and_move(index):
    st = rv.RefusalBatchState(SPEC)
    with pytest.raises(ValueError, match=r"index must be a persistent-batch row \(an int >= 0\)"):
        st.add(index, params(), [])
    with pytest.raises(ValueError, match=r"dst must be a persistent-batch row"):
        st.move(0, index, False)
    assert st.requests == {} and st.apply(make_logits(2)).isinf().sum() == 8


def test_a_thresholds_file_brings_its_mode(tmp_path):
    from rtkern.adapters import sglang as rs
    from rtkern.thresholds import save_thresholds
    path = save_thresholds(tmp_path / "t.json", {n: 0.2 for n in NAMES}, mode="sum")
    for thresholds in (path, str(path)):
        assert rv.RefusalBatchState(SPEC, thresholds=thresholds).defaults["mode"] == "sum"
        assert rv.make_logits_processor(SPEC, thresholds=thresholds).mode == "sum"
        assert rs.make_logit_processor(SPEC, thresholds=thresholds).mode == "sum"
    assert rv.make_logits_processor(SPEC, thresholds=0.2).mode == "category"
    for make in (lambda: rv.RefusalBatchState(SPEC, thresholds=path, mode="free"),
                 lambda: rv.make_logits_processor(SPEC, thresholds=path, mode="category"),
                 lambda: rs.make_logit_processor(SPEC, thresholds=path, mode="category")):
        with pytest.raises(ValueError, match="disagrees with the thresholds file's mode 'sum'"):
            make()


@pytest.mark.parametrize("trained", ["single", "category", None])
def test_spec_found_from_the_vllm_config_follows_the_trained_scheme(tmp_path, trained):
    import json
    from rtkern.spec import control_token_strings
    from tiny import save_tokenizer
    category = control_token_strings("category")[0]
    save_tokenizer(tmp_path, control=["[refuse]", "[respond]"] + category)
    if trained:
        (tmp_path / "rtkern.json").write_text(json.dumps(
            {"scheme": trained, "refusal_tokens": ["[refuse]"] if trained == "single" else category,
             "respond_token": "[respond]"}))
    cfg = SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(tmp_path), model=str(tmp_path)))
    spec = rv._spec_from_vllm_config(cfg, None)
    assert spec.num_categories == (1 if trained == "single" else 5)   # no rtkern.json: category first
    assert rv._spec_from_vllm_config(cfg, "single").num_categories == 1


def test_request_controls_overlay_defaults_and_mode_codes():
    rc = rv.request_controls
    assert rc(SPEC, None) == ([0.5] * 3, [0.0] * 3, 0)
    assert [rc(SPEC, {"refusal_mode": m})[2] for m in ("category", "sum", "free")] == [0, 1, 2]
    assert rc(SPEC, None, mode="sum")[2] == 1 and rc(SPEC, {"refusal_mode": "free"}, mode="sum")[2] == 2
    # The processor's defaults reach the request, mappings included (left-out categories: 0.5 / 0.0).
    assert rc(SPEC, None, logit_bias=[1.0, 2.0, 3.0])[1] == [1.0, 2.0, 3.0]
    assert rc(SPEC, None, thresholds={NAMES[1]: 0.25}, logit_bias={NAMES[0]: 1.0})[:2] == (
        [0.5, 0.25, 0.5], [1.0, 0.0, 0.0])
    # A request's mapping overrides only the categories it names; the others keep the defaults.
    thr, bias, _ = rc(SPEC, {"refusal_thresholds": {NAMES[0]: 0.1}, "refusal_logit_bias": {2: -1.0}},
                      thresholds=0.7, logit_bias=[0.5, 0.5, 0.5])
    assert thr == _f32([0.1, 0.7, 0.7]) and bias == [0.5, 0.5, -1.0]  # the values the sampler's float32 holds
    # A request's number or list replaces the defaults entirely; one [1, C] row is a [C] row.
    assert rc(SPEC, {"refusal_thresholds": 0.2}, thresholds={NAMES[0]: 0.9})[0] == _f32([0.2] * 3)
    assert rc(SPEC, {"refusal_thresholds": [[0.1, 0.2, 0.3]]})[0] == _f32([0.1, 0.2, 0.3])
    # Just above 1 rounds to 1.0 in float32, which a probability of 1 passes: it must stay above 1 (off).
    assert all(t > 1 for t in rc(SPEC, {"refusal_thresholds": 1 + 1e-9})[0])


def _f32(values):
    return torch.tensor(values, dtype=torch.float32).tolist()


@pytest.mark.parametrize("extra, err, msg", [
    ({"refusal_thresholds": [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]}, ValueError, "must be a number"),
    ({"refusal_thresholds": {3: 0.1}}, ValueError, "out of range"),
    ({"refusal_thresholds": {-1: 0.1}}, ValueError, "out of range"),
    ({"refusal_thresholds": {True: 0.1}}, TypeError, "mapping keys"),
    ({"refusal_thresholds": {NAMES[0]: True}}, TypeError, "real numbers"),
    ({"refusal_logit_bias": {NAMES[0]: False}}, TypeError, "real numbers"),
    ({"refusal_mode": 1}, TypeError, "refusal_mode must be a string"),
    # JSON integers of any size: a ValueError the server turns into a 400, never an OverflowError
    ({"refusal_thresholds": 10 ** 400}, ValueError, "must fit a float, got an integer of 401 digits"),
    ({"refusal_logit_bias": {NAMES[0]: -10 ** 400}}, ValueError, "must fit a float"),
    ([("refusal_mode", "sum")], TypeError, "extra_args must be a mapping"),
])
def test_request_controls_rejects(extra, err, msg):
    with pytest.raises(err, match=msg):
        rv.request_controls(SPEC, extra)


def test_unbound_validation_accepts_single_scheme_lists():
    rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds=[0.3]))
    rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds=[0.1] * 5))
    with pytest.raises(ValueError, match="5 numbers"):
        rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds=[0.1, 0.2]))


def test_unidirectional_move_drops_the_overwritten_request():
    st = rv.RefusalBatchState(SPEC)
    st.update(batch_update(2, added=[(0, params(refusal_thresholds=2.0), None, []),     # A: answers
                                     (1, params(refusal_thresholds=0.0), None, [])]))   # B: refuses
    st.update(batch_update(2, moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert sorted(st.requests) == [1]
    z = make_logits(2, seed=4)
    got = st.apply(z.clone())
    torch.testing.assert_close(got[0], masked(z[0]))                              # nobody's row now
    assert got[1].argmax() == RESPOND and st.last_rows.tolist() == [1]            # A, not B


def test_add_without_params_untracks_the_row_and_rows_past_the_logits_wait():
    st = rv.RefusalBatchState(SPEC, thresholds=0.0)
    st.add(0, params(), [])
    st.add(0, None, [])                           # a non-sampling request replaces it
    st.add(3, params(), [])                       # a row past this step's logits: not decided yet
    z = make_logits(2, seed=5)
    torch.testing.assert_close(st.apply(z.clone()), torch.stack([masked(r) for r in z]))
    assert st.last_rows is None and sorted(st.requests) == [3]
    z4 = make_logits(4, seed=5)
    assert st.apply(z4.clone())[3].argmax() in REFUSE and st.last_rows.tolist() == [3]
    with pytest.raises(ValueError, match=r"src must be a persistent-batch row"):
        st.move(-1, 0, False)


def test_default_logit_bias_mode_and_fallback_reach_the_rows(caplog):
    z = make_logits(2, seed=6)
    st = rv.RefusalBatchState(SPEC, mode="free", logit_bias=[0.0, 0.0, 3.0])
    st.update(batch_update(1, added=[(0, params(), None, [])]))
    torch.testing.assert_close(st.apply(z[:1].clone())[0], one_row(z[0], mode="free", logit_bias=[0.0, 0.0, 3.0])[0])
    # Bad request arguments fall back to the processor's defaults, not to built-in ones.
    st = rv.RefusalBatchState(SPEC, thresholds=0.0, logit_bias={NAMES[2]: 1.0})
    st.update(batch_update(2, added=[(0, params(refusal_mode="strict"), None, []),
                                     (1, SimpleNamespace(extra_args=[("refusal_mode", "sum")]), None, [])]))
    got = st.apply(z.clone())
    for i in range(2):
        torch.testing.assert_close(got[i], one_row(z[i], thresholds=0.0, logit_bias=[0.0, 0.0, 1.0])[0])
    assert "ignoring bad refusal arguments" in caplog.text
    assert rv.RefusalBatchState(SPEC, pin_memory=True).pin_memory is False   # no pinning for CPU logits


def test_request_controls_tensor_and_sequence_forms():
    rc = rv.request_controls
    # Integer tensors are real-valued; bool tensors, byte strings and mixed nestings are not.
    assert rc(SPEC, None, thresholds=torch.tensor([0, 2, 2]))[0] == [0.0, 2.0, 2.0]
    assert rc(SPEC, {"refusal_logit_bias": torch.tensor([1, 0, -1], dtype=torch.int32)})[1] == [1.0, 0.0, -1.0]
    with pytest.raises(TypeError, match="real-valued tensor"):
        rc(SPEC, {"refusal_thresholds": torch.tensor([True, False, True])})
    with pytest.raises(TypeError, match="got a string"):
        rc(SPEC, {"refusal_thresholds": b"\x00\x01\x01"})      # three ints if taken as a sequence
    with pytest.raises(TypeError, match="real numbers"):
        rc(SPEC, {"refusal_thresholds": [[0.1, 0.2, 0.3], 0.5]})


def test_optional_base_keeps_any_import_error(tmp_path, monkeypatch):
    from rtkern.adapters._common import optional_base
    (tmp_path / "rtkern_broken_runtime.py").write_text("raise RuntimeError('no CUDA driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base, err = optional_base("rtkern_broken_runtime", "LogitsProcessor")
    assert base is object and isinstance(err, RuntimeError) and "no CUDA driver" in str(err)
    base, err = optional_base("rtkern_no_such_runtime", "LogitsProcessor")
    assert base is object and isinstance(err, ImportError)
    assert optional_base("collections", "OrderedDict")[1] is None


def test_move_and_add_edge_cases_in_one_update():
    st = rv.RefusalBatchState(SPEC, thresholds=0.0)             # every decided row refuses
    # vLLM applies added before moved: a request added at row 2 and moved on to row 3 decides at row 3.
    st.update(batch_update(4, added=[(2, params(), None, [])], moved=[(2, 3, MoveDirectionality.UNIDIRECTIONAL)]))
    assert sorted(st.requests) == [3]
    # A unidirectional move from an empty row onto a waiting row leaves neither row governed.
    st.add(1, params(), [])
    st.move(0, 1, False)
    assert sorted(st.requests) == [3]
    z = make_logits(4, seed=8)
    got = st.apply(z.clone())
    assert st.last_rows.tolist() == [3] and got[3].argmax() in REFUSE
    torch.testing.assert_close(got[:3], torch.stack([masked(r) for r in z[:3]]))
    # Directions given as plain strings are read by name too: a swap keeps both requests.
    st.update(batch_update(4, added=[(0, params(), None, [5]), (1, params(), None, [])],
                           moved=[(0, 1, "MoveDirectionality.swap")]))
    assert sorted(st.requests) == [0, 1, 3] and st.requests[1].output_ids == [5]
    with pytest.raises(TypeError, match="unrecognised BatchUpdate.added entry"):
        st.update(batch_update(4, added=[("a", None, params(), [])]))


def test_unbound_processor_validation_and_factory_arguments(tmp_path):
    with pytest.raises(ValueError, match="extra_args must be a mapping"):
        rv.RefusalLogitsProcessor.validate_params(SimpleNamespace(extra_args=[("refusal_mode", "sum")]))
    rv.RefusalLogitsProcessor.validate_params(params(refusal_thresholds=(0.3,)))   # a tuple: one category
    with pytest.raises(ValueError, match="mode must be one of"):
        rv.make_logits_processor(mode="strict")
    with pytest.raises(ValueError, match="backend"):
        rv.make_logits_processor(SPEC, backend="cuda")
    # The tokenizer path wins over the model path (a model without its own tokenizer files).
    from rtkern.spec import control_token_strings
    from tiny import save_tokenizer
    save_tokenizer(tmp_path, control=control_token_strings("category")[0] + ["[respond]"])
    cfg = SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(tmp_path), model=str(tmp_path / "missing")))
    assert rv._spec_from_vllm_config(cfg, None).num_categories == 5
