"""Kubeconfig problems are one-line errors naming the file (never a traceback from the client library)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.platform.kubernetes.client import KubeClient, KubeConfigError, load_config

GOOD = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: ctx, context: {cluster: c, user: u, namespace: shop}}, {name: nouser, context: {cluster: c}}]
current-context: ctx
"""


@pytest.mark.parametrize(
    ("text", "context", "message"),
    [
        (None, None, "{path}: Configuration file {path} not found"),
        ("apiVersion: v1\nkind: Config\nclusters: []\n", None, "{path}: not a kubeconfig: 'contexts' is missing"),
        ("- [unclosed", None, "{path}: not a valid kubeconfig"),
        (GOOD, "other", "{path}: Context 'other' not found"),
        (GOOD, "nouser", "{path}: context 'nouser' names no user"),
    ],
)
def test_bad_kubeconfig_is_a_one_line_error(tmp_path: Path, text: str | None, context: str | None,
                                            message: str) -> None:
    path = tmp_path / "kubeconfig"
    if text is not None:
        path.write_text(text)
    with pytest.raises(KubeConfigError) as info:
        load_config(str(path), context)
    err = str(info.value)
    assert err.startswith("kubeconfig " + message.format(path=path)) and "\n" not in err


def test_good_kubeconfig_names_its_server_and_context(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(GOOD)
    client = KubeClient.connect(str(path))
    assert client.server == "https://127.0.0.1:6443" and client.context_name == "ctx"
