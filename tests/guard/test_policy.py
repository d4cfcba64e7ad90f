"""A policy is validated data; every error names the key, the value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradguard.guard import ACTIONS, DETECTOR_SPECS, Escalation, Guard, Policy, PolicyError
from gradguard.optim import Adam
from tests.guard.helpers import make_model


def test_the_default_policy() -> None:
    policy = Policy.default()
    assert policy.clip_norm is None
    assert set(policy.detectors) == set(DETECTOR_SPECS)
    assert policy.detector("nonfinite").action == "skip"
    assert policy.detector("loss_spike")["window"] == 128
    assert policy.detector("loss_spike")["sigmas"] == 6.0
    assert policy.detector("divergence").action == "rollback"
    assert policy.detector("starvation").action == "alert"
    assert policy.escalation == (Escalation("skip", 3, "rollback", consecutive=True),
                                 Escalation("rollback", 3, "stop"))


def test_a_mapping_is_merged_over_the_defaults() -> None:
    policy = Policy.from_mapping({
        "clip_norm": 1,
        "detectors": {"loss_spike": {"sigmas": 5, "method": "mad"}, "plateau": False,
                      "starvation": {"action": "reset_accumulators"}},
        "actions": {"rollback": {"skip_batches": 200}},
        "escalation": [{"action": "rollback", "count": 2, "then": "stop", "window": 1000}]})
    assert policy.clip_norm == 1.0
    assert policy.detector("loss_spike")["sigmas"] == 5.0
    assert policy.detector("loss_spike")["window"] == 128
    assert policy.detector("loss_spike")["method"] == "mad"
    assert not policy.enabled("plateau")
    assert policy.detector("starvation").action == "reset_accumulators"
    assert policy.actions["rollback"] == {"skip_batches": 200, "lr_factor": 1.0, "min_age": 0}
    assert policy.escalation == (Escalation("rollback", 2, "stop", window=1000),)
    assert Policy.from_mapping(policy.to_dict()) == policy
    assert policy.uses("reset_accumulators") and not policy.uses("clip")


@pytest.mark.parametrize("mapping, message", [
    ({"clip_norm": 0}, "invalid policy.clip_norm=0: allowed is a finite number > 0 (or "),
    ({"clip": 1.0}, "unknown key policy.clip; did you mean 'clip_norm'? Allowed: clip_norm"),
    ({"detectors": {"loss_spikes": {}}},
     "unknown key policy.detectors.loss_spikes; did you mean 'loss_spike'?"),
    ({"detectors": {"loss_spike": {"sigma": 3}}},
     "unknown key policy.detectors.loss_spike.sigma; did you mean 'sigmas'? Allowed: window,"),
    ({"detectors": {"loss_spike": {"sigmas": -1}}},
     "invalid policy.detectors.loss_spike.sigmas=-1: allowed is a finite number > 0"),
    ({"detectors": {"loss_spike": {"window": 2.5}}},
     "invalid policy.detectors.loss_spike.window=2.5: allowed is an integer >= 2"),
    ({"detectors": {"loss_spike": {"method": "median"}}},
     "invalid policy.detectors.loss_spike.method='median': allowed is one of 'meanstd', 'mad'"),
    ({"detectors": {"loss_spike": {"action": "rolback"}}},
     "invalid policy.detectors.loss_spike.action='rolback': allowed is one of 'skip', 'alert', "
     "'lr_backoff', 'reset_accumulators', 'rollback', 'stop'"),
    ({"detectors": {"starvation": {"action": "skip"}}},
     "invalid policy.detectors.starvation.action='skip': allowed is one of 'alert', "),
    ({"detectors": {"nonfinite": {"action": "alert"}}},
     "invalid policy.detectors.nonfinite.action='alert': allowed is one of 'skip', 'stop'"),
    ({"detectors": {"plateau": {"enabled": "no"}}},
     "invalid policy.detectors.plateau.enabled='no': allowed is true or false"),
    ({"detectors": []}, "invalid policy.detectors=[]: allowed is a mapping"),
    ({"actions": {"lr_backoff": {"factor": 1.5}}},
     "invalid policy.actions.lr_backoff.factor=1.5: allowed is a finite number > 0 and < 1"),
    ({"actions": {"skip": {}}}, "unknown key policy.actions.skip"),
    ({"escalation": {"action": "skip"}}, "invalid policy.escalation={'action': 'skip'}: allowed"),
    ({"escalation": [{"action": "skip", "count": 3}]},
     "missing policy.escalation[0].then: allowed is one of 'alert', "),
    ({"escalation": [{"action": "skip", "count": 0, "then": "stop"}]},
     "invalid policy.escalation[0].count=0: allowed is an integer >= 1"),
    ({"escalation": [{"action": "stop", "then": "stop"}]},
     "invalid policy.escalation[0].then='stop': it must differ from policy.escalation[0].action"),
    ({"escalation": [{"action": "skip", "then": "clip"}]},
     "invalid policy.escalation[0].then='clip': allowed is one of 'alert', 'lr_backoff', "),
])
def test_errors_name_the_key_the_value_and_what_is_allowed(mapping: dict,
                                                           message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_mapping(mapping)
    assert str(caught.value).startswith(message), str(caught.value)


def test_policies_load_from_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "guard.toml").write_text('''
clip_norm = 1.0

[detectors.loss_spike]
sigmas = 5.0
action = "rollback"

[detectors.plateau]
enabled = false

[actions.rollback]
skip_batches = 200
lr_factor = 0.5

[[escalation]]
action = "rollback"
count = 3
then = "stop"
''')
    policy = Policy.load(tmp_path / "guard.toml")
    assert policy.detector("loss_spike").action == "rollback"
    assert policy.actions["rollback"]["lr_factor"] == 0.5
    assert policy.escalation == (Escalation("rollback", 3, "stop"),)
    (tmp_path / "guard.json").write_text(json.dumps(policy.to_dict()))
    assert Policy.load(tmp_path / "guard.json") == policy
    guard = Guard(Adam(make_model().parameters()), str(tmp_path / "guard.toml"))
    assert guard.policy == policy
    with pytest.raises(PolicyError, match=r"allowed are \.toml and \.json files"):
        Policy.load(tmp_path / "guard.yaml")


def test_every_action_is_named() -> None:
    assert ACTIONS == ("skip", "clip", "lr_backoff", "reset_accumulators", "rollback", "stop",
                       "alert")
