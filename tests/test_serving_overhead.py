"""experiments.serving_overhead's argument checks (the measurement itself needs a running server)."""

from __future__ import annotations

import pytest

from experiments import serving_overhead as so


def test_the_port_comes_from_the_config_and_a_different_one_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_options:\n  host: 127.0.0.1\n  port: 8110\napplications: []\n")
    assert so.config_port(cfg, None) == 8110 and so.config_port(cfg, 8110) == 8110
    with pytest.raises(SystemExit):
        so.main([str(cfg), "--port", "8117", "--models", "m"])
    assert "--port 8117, but" in capsys.readouterr().err
    bare = tmp_path / "bare.yaml"
    bare.write_text("applications: []\n")
    assert so.config_port(bare, None) == 8000


def test_a_missing_config_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        so.main([str(tmp_path / "nope.yaml"), "--models", "m"])
    assert "nope.yaml" in capsys.readouterr().err
