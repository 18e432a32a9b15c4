"""SamplingParams: SGLang defaults, normalisation, verify() texts, from_dict validation."""

from __future__ import annotations

import re

import pytest

from research_rt.core.sampling_params import TOP_K_ALL, SamplingParams


def test_defaults_match_sglang():
    sp = SamplingParams()
    expect = dict(
        max_new_tokens=128,
        stop=None,
        stop_token_ids=None,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        min_p=0.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        repetition_penalty=1.0,
        min_new_tokens=0,
        n=1,
        json_schema=None,
        regex=None,
        ebnf=None,
        structural_tag=None,
        ignore_eos=False,
        skip_special_tokens=True,
        spaces_between_special_tokens=True,
        no_stop_trim=False,
        custom_params=None,
    )
    for k, v in expect.items():
        assert getattr(sp, k) == v, k
    sp.verify()
    assert SamplingParams.from_dict(None) == sp
    assert SamplingParams.from_dict({}) == sp


def test_top_k_all_is_2_pow_30():
    assert TOP_K_ALL == 2**30


@pytest.mark.parametrize("t", [0.0, 1e-7])
def test_temperature_zero_is_greedy(t):
    sp = SamplingParams(temperature=t, top_k=50).normalize()
    assert sp.temperature == 1.0 and sp.top_k == 1 and sp.is_greedy


def test_normalize_top_k_and_stop():
    sp = SamplingParams(temperature=0.7).normalize()
    assert sp.top_k == TOP_K_ALL and not sp.is_greedy and sp.temperature == 0.7
    assert SamplingParams(top_k=5).normalize().top_k == 5
    assert SamplingParams(stop="abc").normalize().stop == ["abc"]
    assert SamplingParams(stop=["a", "", "b"]).normalize().stop == ["a", "b"]
    sp = SamplingParams(stop=[], stop_token_ids=[]).normalize()
    assert sp.stop == [] and sp.stop_token_ids == []
    assert SamplingParams().normalize().stop_token_ids == []
    assert SamplingParams(temperature=1e-3).normalize().top_k == TOP_K_ALL


ERRORS = [
    (dict(temperature=-0.5), "temperature must be non-negative, got -0.5."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5."),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1."),
    (dict(min_p=1.1), "min_p must be in [0, 1], got 1.1."),
    (dict(top_k=0), "top_k must be -1 (disable) or at least 1, got 0."),
    (dict(top_k=-2), "top_k must be -1 (disable) or at least 1, got -2."),
    (dict(frequency_penalty=2.5), "frequency_penalty must be in [-2, 2], got 2.5."),
    (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2], got -2.5."),
    (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2], got 3.0."),
    (dict(presence_penalty=-3.0), "presence_penalty must be in [-2, 2], got -3.0."),
    (dict(repetition_penalty=-0.1), "repetition_penalty must be in [0, 2], got -0.1."),
    (dict(repetition_penalty=2.1), "repetition_penalty must be in [0, 2], got 2.1."),
    (dict(min_new_tokens=-1), "min_new_tokens must be in [0, max_new_tokens], got -1."),
    (dict(max_new_tokens=-1), "max_new_tokens must be at least 0, got -1."),
    (dict(max_new_tokens=3, min_new_tokens=5), "min_new_tokens must be in [0, max_new_tokens(3)], got 5."),
    (dict(regex="a+", json_schema="{}"), "Only one of regex, json_schema, or ebnf can be set."),
    (dict(regex="a", ebnf="root ::= 'a'"), "Only one of regex, json_schema, or ebnf can be set."),
]


@pytest.mark.parametrize("kwargs,msg", ERRORS)
def test_verify_error_texts(kwargs, msg):
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        SamplingParams(**kwargs).verify()
    # the same through from_dict (types are fine, so verify is what rejects it)
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        SamplingParams.from_dict(kwargs).verify()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(top_p=1.0),
        dict(top_p=1e-9),
        dict(min_p=0.0),
        dict(min_p=1.0),
        dict(top_k=-1),
        dict(top_k=1),
        dict(frequency_penalty=-2.0, presence_penalty=2.0),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=2.0),
        dict(max_new_tokens=0),
        dict(max_new_tokens=5, min_new_tokens=5),
        dict(max_new_tokens=None, min_new_tokens=1000),
        dict(stop=[], stop_token_ids=[]),
    ],
)
def test_verify_boundaries_accepted(kwargs):
    SamplingParams(**kwargs).verify()


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="n must be at least 1"):
        SamplingParams(n=0).verify()


def test_unknown_key_names_field():
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict({"zzz": 1, "aaa": 2, "top_k": 3})
    assert "zzz" in str(e.value) and "aaa" in str(e.value) and "top_k" not in str(e.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("temperature", "hot"),
        ("temperature", True),
        ("top_k", 2.5),
        ("top_k", True),
        ("max_new_tokens", "10"),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", 3),
        ("ignore_eos", 1),
        ("regex", 3),
        ("custom_params", [1]),
        ("temperature", None),
        ("n", None),
    ],
)
def test_wrong_type_names_field(key, value):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        SamplingParams.from_dict({key: value})


def test_from_dict_accepts_valid_values():
    sp = SamplingParams.from_dict(
        {
            "temperature": 0,  # int is fine for a float
            "top_k": 5,
            "stop": "x",
            "stop_token_ids": [1, 2],
            "max_new_tokens": None,
            "ignore_eos": True,
            "custom_params": {"a": 1},
            "seed": 42,
        }
    )
    assert sp.temperature == 0 and sp.top_k == 5 and sp.stop == "x" and sp.stop_token_ids == [1, 2]
    assert sp.max_new_tokens is None and sp.ignore_eos is True and sp.sampling_seed == 42


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(temperature=float("nan")), "sampling_params.temperature must be a finite number, got NaN."),
        (dict(top_p=float("inf")), "sampling_params.top_p must be a finite number, got Infinity."),
        (dict(min_p=float("-inf")), "sampling_params.min_p must be a finite number, got -Infinity."),
        (
            dict(temperature=1e39),
            "sampling_params.temperature must be a finite number, got 1e+39 (beyond float32's range).",
        ),
        (dict(frequency_penalty=10**400), "sampling_params.frequency_penalty must be a finite number"),
        (dict(n=257), "n must be at most 256, got 257."),
        (dict(stop=["s"] * 33), "sampling_params.stop may hold at most 32 strings, got 33."),
        (dict(stop="s" * 513), "sampling_params.stop strings may be at most 512 characters long"),
        (dict(stop_token_ids=[1] * 1025), "sampling_params.stop_token_ids may hold at most 1024 ids"),
        (dict(sampling_seed=2**63), "sampling_params.sampling_seed (seed) must be in [-2**63, 2**63)"),
        (dict(sampling_seed=-(2**63) - 1), "sampling_params.sampling_seed (seed) must be in"),
    ],
)
def test_limits_and_non_finite(kwargs, msg):
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        SamplingParams(**kwargs).verify()
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        SamplingParams.from_dict(kwargs).verify()


def test_limits_boundaries_accepted():
    SamplingParams(n=256, stop=["s" * 512] * 32, stop_token_ids=[1] * 1024, sampling_seed=-(2**63)).verify()
    SamplingParams(temperature=3.4e38, sampling_seed=2**63 - 1).verify()


def test_normalize_keeps_tensor_values_in_range():
    assert SamplingParams(top_k=10**30, temperature=0.5).normalize().top_k == TOP_K_ALL
    assert SamplingParams(top_k=TOP_K_ALL + 1).normalize().top_k == TOP_K_ALL
    assert SamplingParams(repetition_penalty=0.0).normalize().repetition_penalty == 1e-6
    assert SamplingParams(repetition_penalty=0.5).normalize().repetition_penalty == 0.5
