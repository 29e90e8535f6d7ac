"""The model interface: finding a family by model.name (built in or the user's own), and the
errors that say why one cannot be used."""

import sys

import pytest

from raytitan.config.job import ConfigError, JobConfig
from raytitan.config.plan import plan_run
from raytitan.models import MODELS, get_spec
from raytitan.models.spec import ModelSpec, ModelSpecError


def test_every_built_in_family_is_a_spec_with_flavors():
    for name in MODELS:
        spec = get_spec(name)
        assert isinstance(spec, ModelSpec) and spec.name == name and spec.flavors


def test_a_spec_in_the_users_code_is_found_by_module_and_attribute(tmp_path, monkeypatch):
    llama = get_spec("llama3")
    (tmp_path / "my_models.py").write_text(
        "import dataclasses\nfrom raytitan.models import get_spec\n"
        "spec = dataclasses.replace(get_spec('llama3'), name='mine')\nnot_a_spec = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_spec("my_models:spec").build is llama.build
    with pytest.raises(ModelSpecError, match="my_models.not_a_spec is int, not a raytitan.models.spec.ModelSpec"):
        get_spec("my_models:not_a_spec")
    with pytest.raises(ModelSpecError, match="cannot import no_such_module.*importable from the working directory"):
        get_spec("no_such_module:spec")
    sys.modules.pop("my_models", None)


def test_unknown_names_and_flavors_are_config_errors_before_launch():
    config = JobConfig()
    config.model.name = "gpt5"
    with pytest.raises(ConfigError, match="'gpt5' is not a built-in model"):
        plan_run(config, 1)
    config.model.name, config.model.flavor = "llama3", "9B"
    with pytest.raises(ConfigError, match="'9B' is not a llama3 flavor: one of debugmodel"):
        plan_run(config, 1)
