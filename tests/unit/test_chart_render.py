"""The charts' generated files are current; values are checked like Helm checks them; upgrades never
skip a major version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether import __version__
from tether.core.install.upgrade import UpgradeRefused, check_step
from tether.core.install.values import ValuesInputError, check, parse_set, schema_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tether-control-plane"


def test_generated_chart_files_match_the_generator() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "charts" / "generate.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_chart_versions_are_the_package_version() -> None:
    for chart in ("tether-control-plane", "tether-crds"):
        meta = yaml.safe_load((ROOT / "charts" / chart / "Chart.yaml").read_text())
        assert meta["version"] == meta["appVersion"] == __version__


def test_set_parsing_types_values_like_helm() -> None:
    assert parse_set(["proxy.logLevel=debug,controllerReplicas=3", "enablePodAntiAffinity=true"]) == {
        "proxy": {"logLevel": "debug"}, "controllerReplicas": 3, "enablePodAntiAffinity": True}
    assert parse_set(["a.b={x,y}", r"podLabels.app\.kubernetes\.io/name=web"]) == {
        "a": {"b": ["x", "y"]}, "podLabels": {"app.kubernetes.io/name": "web"}}
    assert parse_set(["x=007"]) == {"x": "007"}
    with pytest.raises(ValuesInputError, match="expected KEY=VALUE"):
        parse_set(["proxy.logLevel"])


def test_schema_refuses_unknown_and_misplaced_keys() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = schema_for(defaults)
    assert check({"proxy": {"resources": {"cpu": {"limit": 1}}}, "podLabels": {"any": "thing"}}, schema) == []
    problems = check({"linkerd-sip": {"tls": {"crt": "x"}}, "dashboard": {"replicas": 2},
                      "proxy": {"logLevle": "x"}, "controllerReplicas": "three"}, schema)
    text = "\n".join(problems)
    assert "linkerd-sip: unknown value: not a value of the control-plane chart; the issuer's certificate and key " \
           "are identity.issuer.tls.crtPEM and identity.issuer.tls.keyPEM" in text
    assert "dashboard: unknown value: belongs to the viz extension" in text
    assert "proxy.logLevle: unknown value (known here:" in text
    assert "controllerReplicas: 'three' is not integer" in text


def test_values_ha_is_valid_and_sets_ha() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    ha = yaml.safe_load((CHART / "values-ha.yaml").read_text())
    assert check(ha, schema_for(defaults)) == []
    assert ha["controllerReplicas"] == 3 and ha["webhookFailurePolicy"] == "Fail"
    assert defaults["webhookFailurePolicy"] == "Ignore"
    assert ha["enablePodAntiAffinity"] and ha["enablePodDisruptionBudget"]


@pytest.mark.parametrize(("installed", "target"), [("1.4.0", "2.0.0"), ("2.0.0", "2.9.1"), ("0.1.0", "0.2.0"),
                                                    ("0.9.0", "1.0.0"), ("2.1.0", "1.0.0")])
def test_upgrade_one_major_at_a_time_is_allowed(installed: str, target: str) -> None:
    check_step(installed, target)


@pytest.mark.parametrize(("installed", "target", "skips"), [("1.4.0", "3.0.0", "skips 2.x"),
                                                            ("0.1.0", "0.3.0", "skips 0.2"),
                                                            ("0.1.0", "2.0.0", "skips 1.x"),
                                                            ("3.0.0", "1.0.0", "downgrading")])
def test_upgrade_skipping_a_major_is_refused_and_says_why(installed: str, target: str, skips: str) -> None:
    with pytest.raises(UpgradeRefused) as e:
        check_step(installed, target)
    assert skips in str(e.value) and "one major version at a time" in str(e.value)
